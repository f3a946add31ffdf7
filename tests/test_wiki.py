"""The Wikipedia knowledge step against a local MediaWiki-compatible server (no network, docs/design.md §6).

The production path is the one tested: `fetch_knowledge` talks HTTP to `FakeMediaWiki` through its
ordinary `api_url`; only the far end of the wire is fake.
"""

from __future__ import annotations

import email.utils
import socket
import time
from pathlib import Path

import pytest

import finer
from finer.cache import Cache
from finer.data.wiki import WikiStats, _retry_after, fetch_knowledge
from finer.errors import FinerError
from finer.schema import Concept
from finer.testing.fake_mediawiki import FakeMediaWiki, FakePage, Fault

WARBLER = FakePage.article(
    "The cerulean warbler is a small songbird of the New World warbler family.",
    {
        "Taxonomy": "It was described by Alexander Wilson in 1810.",
        "Description": "Adult males have pale cerulean blue upperparts and white underparts."
        "\n\n\n=== Song ===\nA rising buzz.",
        "Distribution": "It breeds in eastern North America.",
    },
    revid=4242,
)
BOEING = FakePage.article(
    "The Boeing 737 Next Generation is a narrow-body airliner.",
    {
        "Development": "Launched in 1993.",
        "Description": "A general description that aircraft must not get.",
        "Design": "It has a redesigned wing with a larger area and new CFM56-7 engines.",
    },
    revid=777,
)
PAGES = {
    "Cerulean warbler": WARBLER,
    "Boeing 737 Next Generation": BOEING,
    "Boeing 737-800": FakePage(redirect="Boeing 737 Next Generation"),
    "Acura RL": FakePage.article("The Acura RL is a sedan.", {"History": "Sold from 1996 to 2012."}),
    "Chihuahua": FakePage(text="Chihuahua may refer to: a city, a state, a dog breed.", disambiguation=True),
    "Chihuahua (dog)": FakePage.article("The Chihuahua is a toy dog breed.", {"Description": "Apple head."}),
    "Mercury": FakePage(text="Mercury may refer to: a planet, an element.", disambiguation=True),
    "Mercury (bird)": FakePage(text="Mercury (bird) may refer to: two birds.", disambiguation=True),
    "Bad bird": FakePage.article("Never served.", {"Description": "Never served."}),
}


def bird(cid: str, name: str) -> Concept:
    return Concept(concept_id=cid, fine=[name], superordinate="Bird")


def run(concepts: list[Concept], wiki: FakeMediaWiki, tmp_path: Path, **kwargs) -> WikiStats:
    kwargs = {"progress": False, "retry_base": 0.001, "cache": Cache(tmp_path / "cache"), **kwargs}
    return fetch_knowledge(concepts, api_url=wiki.url, **kwargs)


def searches(wiki: FakeMediaWiki) -> list[str]:
    return [r.params["srsearch"] for r in wiki.log if "srsearch" in r.params]


def test_preferred_section_per_superordinate(tmp_path: Path) -> None:
    warbler = bird("w", "Cerulean warbler")
    jet = Concept(concept_id="j", fine=["Boeing 737 Next Generation"], superordinate="Airplane")
    car = Concept(concept_id="c", fine=["Acura RL"], superordinate="Car")
    with FakeMediaWiki(PAGES) as wiki:
        stats = run([warbler, jet, car], wiki, tmp_path)
        base = wiki.base
    assert warbler.knowledge is not None and jet.knowledge is not None and car.knowledge is not None
    assert warbler.knowledge.status == "found"
    assert warbler.knowledge.section == "Description"
    assert warbler.knowledge.text == (
        "Adult males have pale cerulean blue upperparts and white underparts. Song A rising buzz."
    )
    assert warbler.knowledge.title == "Cerulean warbler"
    assert warbler.knowledge.url == f"{base}/wiki/Cerulean_warbler"
    assert warbler.knowledge.revision_id == 4242
    assert jet.knowledge.section == "Design"
    assert jet.knowledge.text == "It has a redesigned wing with a larger area and new CFM56-7 engines."
    # no Design section: the whole page
    assert car.knowledge.section == ""
    assert car.knowledge.text == "The Acura RL is a sedan. History Sold from 1996 to 2012."
    assert stats.status == {"found": 3}
    assert stats.failures == []


def test_text_is_cut_to_words(tmp_path: Path) -> None:
    warbler = bird("w", "Cerulean warbler")
    with FakeMediaWiki(PAGES) as wiki:
        run([warbler], wiki, tmp_path, words=5)
    assert warbler.knowledge is not None
    assert warbler.knowledge.text == "Adult males have pale cerulean"


def test_redirect_is_followed_and_target_recorded(tmp_path: Path) -> None:
    jet = Concept(concept_id="j", fine=["Boeing 737-800"], superordinate="Airplane")
    with FakeMediaWiki(PAGES, search={"Boeing 737-800": ["Boeing 737-800"]}) as wiki:
        run([jet], wiki, tmp_path)
        base = wiki.base
    assert jet.knowledge is not None
    assert jet.knowledge.status == "found"
    assert jet.knowledge.title == "Boeing 737 Next Generation"
    assert jet.knowledge.url == f"{base}/wiki/Boeing_737_Next_Generation"
    assert jet.knowledge.revision_id == 777
    assert jet.knowledge.section == "Design"


def test_disambiguation_retries_with_superordinate(tmp_path: Path) -> None:
    dog = Concept(concept_id="d", fine=["Chihuahua"], superordinate="Dog")
    with FakeMediaWiki(PAGES) as wiki:
        stats = run([dog], wiki, tmp_path)
        assert searches(wiki) == ["Chihuahua", "Chihuahua dog"]
    assert dog.knowledge is not None
    assert (dog.knowledge.status, dog.knowledge.title) == ("found", "Chihuahua (dog)")
    assert dog.knowledge.text == "Apple head."
    assert stats.status == {"found": 1}


def test_disambiguation_both_times_is_recorded(tmp_path: Path) -> None:
    mercury = bird("m", "Mercury")
    with FakeMediaWiki(PAGES) as wiki:
        stats = run([mercury], wiki, tmp_path)
    assert mercury.knowledge is not None
    assert (mercury.knowledge.status, mercury.knowledge.title, mercury.knowledge.text) == (
        "disambiguation",
        "Mercury",
        "",
    )
    assert stats.status == {"disambiguation": 1}


def test_no_hit_is_missing(tmp_path: Path) -> None:
    ghost = bird("g", "Imaginary nightjar")
    with FakeMediaWiki(PAGES) as wiki:
        stats = run([ghost], wiki, tmp_path)
        assert searches(wiki) == ["Imaginary nightjar", "Imaginary nightjar bird"]
    assert ghost.knowledge is not None
    assert (ghost.knowledge.status, ghost.knowledge.text, ghost.knowledge.title) == ("missing", "", "")
    assert stats.status == {"missing": 1}
    assert stats.failures == []  # an answered "no such page" is not a failure


def test_429_retry_after_is_honoured(tmp_path: Path) -> None:
    warbler = bird("w", "Cerulean warbler")
    with FakeMediaWiki(PAGES, faults=[Fault(429, retry_after="1")]) as wiki:
        stats = run([warbler], wiki, tmp_path)
        log = wiki.log
    assert [r.status for r in log] == [429, 200, 200, 200]
    assert log[1].started - log[0].started >= 1.0  # the base delay is 1 ms: only Retry-After waits this long
    assert warbler.knowledge is not None and warbler.knowledge.status == "found"
    assert (stats.requests, stats.retries) == (4, 1)


def test_500_then_success(tmp_path: Path) -> None:
    warbler = bird("w", "Cerulean warbler")
    with FakeMediaWiki(PAGES, faults=[Fault(500, match="Cerulean", times=2)]) as wiki:
        stats = run([warbler], wiki, tmp_path)
        assert [r.status for r in wiki.log] == [500, 500, 200, 200, 200]
    assert warbler.knowledge is not None and warbler.knowledge.status == "found"
    assert (stats.requests, stats.retries, stats.failures) == (5, 2, [])


def test_maxlag_api_error_is_retried(tmp_path: Path) -> None:
    warbler = bird("w", "Cerulean warbler")
    with FakeMediaWiki(PAGES, faults=[Fault(200, error="maxlag", retry_after="0")]) as wiki:
        stats = run([warbler], wiki, tmp_path)
    assert warbler.knowledge is not None and warbler.knowledge.status == "found"
    assert stats.retries == 1


def test_persistent_500_marks_missing_without_crashing(tmp_path: Path) -> None:
    bad, good = bird("bad", "Bad bird"), bird("good", "Cerulean warbler")
    with FakeMediaWiki(PAGES, faults=[Fault(500, match="Bad bird", times=None)]) as wiki:
        stats = run([bad, good], wiki, tmp_path, max_retries=2)
        assert searches(wiki).count("Bad bird") == 3  # one try and two retries
    assert bad.knowledge is not None and bad.knowledge.status == "missing"
    assert good.knowledge is not None and good.knowledge.status == "found"
    assert stats.status == {"missing": 1, "found": 1}
    assert [f["concept_id"] for f in stats.failures] == ["bad"]
    reason = stats.failures[0]["reason"]
    assert "HTTP 500" in reason and "3 attempt" in reason and "\n" not in reason


def test_failures_are_not_cached(tmp_path: Path) -> None:
    bad = bird("bad", "Bad bird")
    with FakeMediaWiki(PAGES, faults=[Fault(503, times=None)]) as wiki:
        run([bad], wiki, tmp_path, max_retries=0)
    with FakeMediaWiki(PAGES) as wiki:
        stats = run([bad], wiki, tmp_path)
        assert wiki.requests == 3
    assert bad.knowledge is not None and bad.knowledge.status == "found"
    assert stats.cache_hits == 0


def test_each_name_is_fetched_once(tmp_path: Path) -> None:
    concepts = [bird(f"w{i}", "Cerulean warbler") for i in range(3)] + [
        Concept(concept_id="j", fine=["Boeing 737 Next Generation"], superordinate="Airplane")
    ]
    with FakeMediaWiki(PAGES) as wiki:
        stats = run(concepts, wiki, tmp_path)
        assert sorted(searches(wiki)) == ["Boeing 737 Next Generation", "Cerulean warbler"]
        assert wiki.requests == 6
    assert (stats.concepts, stats.lookups, stats.status) == (4, 2, {"found": 4})
    texts = {c.knowledge.text for c in concepts[:3] if c.knowledge}
    assert len(texts) == 1 and concepts[0].knowledge is not concepts[1].knowledge


def test_second_run_makes_no_requests(tmp_path: Path) -> None:
    concepts = [bird("w", "Cerulean warbler"), Concept("d", ["Chihuahua"], "Dog"), bird("g", "Nobody")]
    with FakeMediaWiki(PAGES) as wiki:
        first = run(concepts, wiki, tmp_path)
        before = [c.knowledge for c in concepts]
        assert first.requests == wiki.requests > 0
        second = run(concepts, wiki, tmp_path)
        assert wiki.requests == first.requests  # nothing new reached the server
        assert (second.requests, second.cache_hits) == (0, 3)
        assert [c.knowledge for c in concepts] == before
        run(concepts[:1], wiki, tmp_path, words=5)  # a different cut is a different entry
        assert wiki.requests == first.requests + 3


def test_a_cache_entry_of_another_finer_version_is_fetched_again(tmp_path: Path) -> None:
    """Entries written by an older finer (unwrapped) or a newer one (fields we lack) are misses."""
    import json

    concepts = [bird("w", "Cerulean warbler")]
    with FakeMediaWiki(PAGES) as wiki:
        run(concepts, wiki, tmp_path)
        (entry,) = (tmp_path / "cache" / "wiki").rglob("*.json")
        stored = json.loads(entry.read_text())
        for other in (
            stored["value"],  # the layout before cache entries carried a version
            {**stored, "value": {**stored["value"], "licence": "CC BY-SA"}},  # a field this finer lacks
        ):
            entry.write_text(json.dumps(other))
            before = wiki.requests
            stats = run(concepts, wiki, tmp_path)
            assert stats.cache_hits == 0 and wiki.requests > before
            assert concepts[0].knowledge.status == "found"


def test_user_agent_names_the_project(tmp_path: Path) -> None:
    with FakeMediaWiki(PAGES) as wiki:
        run([bird("w", "Cerulean warbler")], wiki, tmp_path)
        agents = {r.user_agent for r in wiki.log}
    assert len(agents) == 1
    (agent,) = agents
    assert agent.startswith(f"finer/{finer.__version__} (")
    assert "research toolkit" in agent


def test_concurrency_is_bounded(tmp_path: Path) -> None:
    pages = {f"Warbler {i}": FakePage.article(f"Warbler {i}.", {"Description": "Blue."}) for i in range(12)}
    concepts = [bird(str(i), f"Warbler {i}") for i in range(12)]
    with FakeMediaWiki(pages, delay=0.05) as wiki:
        stats = run(concepts, wiki, tmp_path, concurrency=3)
        assert wiki.max_in_flight == 3
    assert stats.status == {"found": 12}


def test_retry_after_http_date() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= (_retry_after(when) or 0) <= 30
    assert _retry_after("7") == 7.0
    assert _retry_after("soon") is None


def test_an_unreachable_endpoint_stops_the_run_at_once(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on: every connection is refused
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/w/api.php"
    concepts = [bird(f"b{i}", f"Bird {i}") for i in range(50)]
    started = time.perf_counter()
    with pytest.raises(FinerError, match=r"cannot reach .*127\.0\.0\.1.*--wiki-api.*--no-knowledge") as err:
        fetch_knowledge(concepts, api_url=url, progress=False, retry_base=0.001, cache=Cache(tmp_path / "c"))
    assert "connection failed" in str(err.value) and "\n" not in str(err.value)
    assert time.perf_counter() - started < 10
