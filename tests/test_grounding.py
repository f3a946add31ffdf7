"""VLM-grounded attributes: exemplar images in attribute extraction, and `finer ground` per image.

The fake OpenAI-compatible server answers *by image*: it decodes the data URL it was sent and reads the
image's mean colour, so every reply, and therefore every expected column value, is known exactly.
"""

from __future__ import annotations

import base64
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import datasets
import pytest
from layouts import GARBAGE
from PIL import Image, ImageStat

from finer.builders import ImageRecord, Source
from finer.cli import main
from finer.data.build import BuildConfig, build, iter_concepts
from finer.data.grounding import GroundConfig, ground, parse_grounding_reply
from finer.data.knowledge import Exemplars, KnowledgeOptions
from finer.errors import FinerError
from finer.records import (
    BuildKnowledge,
    GroundedImages,
    GroundingRecord,
    GroundingSkip,
    GroundingVerdicts,
    read_grounding_results,
)
from finer.run_folder import OutputLock
from finer.schema import Concept
from finer.testing.fake_mediawiki import FakeMediaWiki, FakePage
from finer.testing.fake_openai import FakeOpenAI, Fault
from tests.records_check import declared

# --- the endpoint, scripted by image ----------------------------------------------------------------


def image_urls(request: dict[str, Any]) -> list[str]:
    return [
        block["image_url"]["url"]
        for message in request["messages"]
        if isinstance(message["content"], list)
        for block in message["content"]
        if block.get("type") == "image_url"
    ]


def colour_of(url: str) -> tuple[int, int, int]:
    """Mean colour of a data-URL image, each channel rounded to the nearest multiple of 10 (JPEG noise)."""
    image = Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2]))).convert("RGB")
    return tuple(10 * round(c / 10) for c in ImageStat.Stat(image).mean)  # type: ignore[return-value]


def listed(request: dict[str, Any]) -> list[str]:
    """The attributes a grounding request lists: the schema's keys, else the prompt's "- " lines."""
    schema = (request.get("response_format") or {}).get("json_schema", {}).get("schema")
    if schema:
        return list(schema["properties"])
    text = "\n".join(
        b.get("text", "") for m in request["messages"] for b in m["content"] if isinstance(b, dict)
    )
    return [line[2:] for line in text.splitlines() if line.startswith("- ") and '"' not in line]


def verdicts(colour: tuple[int, int, int], attributes: list[str]) -> dict[str, str]:
    """The scripted verdicts: attribute i is visible when bit i of (red / 40) is set, else not visible."""
    code = colour[0] // 40
    return {a: "visible" if code >> i & 1 else "not visible" for i, a in enumerate(attributes)}


UNKNOWN = "purple wings"  # named in replies about images whose green is 250: not in any list


def grounder(request: dict[str, Any]) -> dict[str, str]:
    (url,) = image_urls(request)
    colour = colour_of(url)
    reply = verdicts(colour, listed(request))
    if colour[1] == 250:
        reply[UNKNOWN] = "visible"
    return reply


# --- a synthetic CUB-200-2011 with per-image attribute labels ----------------------------------------

CLASSES = {"1": "001.Black_footed_Albatross", "2": "002.Laysan_Albatross", "3": "003.Pine_Grosbeak"}
ATTRIBUTES = [
    "has_bill_shape::hooked_seabird",
    "has_wing_color::brown",
    "has_wing_color::white",
    "has_breast_color::grey",
    "has_size::small_(5_-_9_in)",
]
#: Class id -> % of its images with each attribute: required >= 50 (size is never an attribute).
SCORES = {"1": [80, 60, 0, 70, 0], "2": [90, 0, 55, 0, 0], "3": [0, 0, 0, 0, 100]}
REQUIRED = {  # what cub-annotations makes of SCORES, strongest first
    "001": ["hooked seabird bill", "grey breast", "brown wing"],
    "002": ["hooked seabird bill", "white wing"],
    "003": [],
}
PER_CLASS = 4  # images 1..12; the 4th of each class is a test image
CORRUPT = "2"
STRAY = "5"  # the image whose reply names an attribute not in its list


def cub_colour(n: int) -> tuple[int, int, int]:
    """Distinct per image (so no two requests share a cache key); red steps through 40 * 0..6."""
    return (40 * (n % 7) + 10, 250 if str(n) == STRAY else 10 * n, 100)


def is_present(n: int, attribute_id: int) -> bool:
    return (n + attribute_id) % 3 != 0


def write_cub_with_image_labels(parent: Path) -> Path:
    """`parent/CUB_200_2011/…` with `attributes/image_attribute_labels.txt` (and one corrupt image)."""
    base = parent / "CUB_200_2011"
    images, labels, splits, image_labels = [], [], [], []
    for n in range(1, 3 * PER_CLASS + 1):
        class_id = str((n - 1) // PER_CLASS + 1)
        relative = f"{CLASSES[class_id]}/img_{n:04d}.jpg"
        path = base / "images" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), cub_colour(n)).save(path, format="JPEG", quality=95)
        if str(n) == CORRUPT:
            path.write_bytes(GARBAGE)
        images.append(f"{n} {relative}")
        labels.append(f"{n} {class_id}")
        splits.append(f"{n} {0 if n % PER_CLASS == 0 else 1}")
        for a in range(1, len(ATTRIBUTES) + 1):
            image_labels.append(f"{n} {a} {int(is_present(n, a))} 3 1.5")
    files = {
        base / "images.txt": images,
        base / "classes.txt": [f"{i} {name}" for i, name in CLASSES.items()],
        base / "image_class_labels.txt": labels,
        base / "train_test_split.txt": splits,
        base / "attributes" / "image_attribute_labels.txt": image_labels,
        base / "attributes" / "class_attribute_labels_continuous.txt": [
            " ".join(f"{v:.4f}" for v in SCORES[c]) for c in CLASSES
        ],
        parent / "attributes.txt": [f"{i} {name}" for i, name in enumerate(ATTRIBUTES, 1)],
    }
    for path, lines in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return base


@pytest.fixture(scope="module")
def cub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic CUB copy's parent folder."""
    parent = tmp_path_factory.mktemp("cub")
    write_cub_with_image_labels(parent)
    return parent


@pytest.fixture(scope="module")
def built(cub: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CUB copy built with exact CUB phrases as attributes; the corrupt image kept as a row."""
    out = tmp_path_factory.mktemp("built") / "cub"
    with FakeMediaWiki({}) as wiki:
        build(
            BuildConfig(
                source="cub200",
                root=cub,
                out=out,
                knowledge=True,
                check_images=False,
                knowledge_options=KnowledgeOptions(
                    extractor="cub-annotations", wiki_api=wiki.url, cache=out.parent / "cache"
                ),
            )
        )
    return out


def expected_visible(image_id: str, concept_id: str) -> list[str]:
    attributes = REQUIRED[concept_id]
    return [a for a, v in verdicts(cub_colour(int(image_id)), attributes).items() if v == "visible"]


def config(dataset: Path, out: Path, server: FakeOpenAI, **extra: Any) -> GroundConfig:
    return GroundConfig(
        dataset=str(dataset),
        out=out,
        model="test-vlm",
        base_url=server.url,
        cache=out.parent / "cache",
        progress=False,
        **extra,
    )


def tree_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


# --- the reply parser -------------------------------------------------------------------------------

ASKED = ["black crown", "white wing bars", "yellow rump"]


@pytest.mark.parametrize(
    ("reply", "answers", "dropped"),
    [
        (
            '{"black crown": "visible", "white wing bars": "not visible"}',
            {"black crown": "visible", "white wing bars": "not visible"},
            0,
        ),
        (
            '```json\n{"answers": {"Black Crown": "Visible", "pink legs": "visible"}}\n```',
            {"black crown": "visible"},
            1,
        ),
        ('Sure: [{"attribute": "yellow rump", "verdict": "unsure"}]', {"yellow rump": "unsure"}, 0),
        ('{"attributes": [{"attribute": "yellow rump", "status": "unsure"}]}', {"yellow rump": "unsure"}, 0),
        (
            "- **black crown**: yes\n- White wing bars - not visible.\n"
            "2. yellow rump = can't tell\nNote: a bird",
            {"black crown": "visible", "white wing bars": "not visible", "yellow rump": "unsure"},
            0,
        ),
        (
            '{"black crown": true, "yellow rump": false}',
            {"black crown": "visible", "yellow rump": "not visible"},
            0,
        ),
        ("I think this is a lovely bird.", None, None),
    ],
)
def test_parse_grounding_reply(reply: str, answers: dict[str, str] | None, dropped: int | None) -> None:
    parsed = parse_grounding_reply(reply, ASKED)
    assert parsed == (None if answers is None else (answers, dropped))


# --- finer ground -----------------------------------------------------------------------------------


def test_ground_writes_known_values_and_makes_no_calls_on_rerun(built: Path, tmp_path: Path) -> None:
    before = tree_state(built)
    out = tmp_path / "grounded"
    with FakeOpenAI(grounder) as server:
        summary = ground(config(built, out, server))
        calls = server.count
        again = ground(config(built, out, server, overwrite=True))
        assert server.count == calls, "a re-run asked the endpoint again"
    asked = [n for n in range(1, 13) if (n - 1) // PER_CLASS < 2 and str(n) != CORRUPT]
    assert calls == summary["calls"] == len(asked)
    assert again["calls"] == 0 and again["cache_hits"] == len(asked)
    assert tree_state(built) == before, "the input dataset was modified"

    grounded = datasets.load_from_disk(str(out))
    columns = ["image_id", "concept_id", "attributes_required", "attributes_visible", "grounding_status"]
    rows = [row for split in ("train", "test") for row in grounded[split].select_columns(columns).to_list()]
    ids = [row["image_id"] for row in rows]
    assert sorted(ids, key=int) == [str(n) for n in range(1, 13)]  # every row, the unreadable one too
    (broken,) = [row for row in rows if row["image_id"] == CORRUPT]
    assert broken["grounding_status"] == "unreadable" and broken["attributes_visible"] is None
    rows.remove(broken)
    for row in rows:
        assert row["attributes_visible"] == expected_visible(row["image_id"], row["concept_id"]), row
        assert row["grounding_status"] == "ok"
    assert any(row["attributes_visible"] for row in rows) and any(
        not row["attributes_visible"] for row in rows
    )
    # image cells stay as the build stored them (file references), and the decoded pixels are right
    first = grounded["train"].with_format("arrow")[0]["image"][0].as_py()
    assert first["path"] and first["bytes"] is None
    assert grounded["train"][0]["image"].size == (16, 16)
    assert (out / "concepts.jsonl").is_file() and (out / "build.json").is_file()

    assert [(s["split"], s["image_id"]) for s in summary["skipped"]] == [("train", CORRUPT)]
    counts = {"grounded": len(asked), "no_attributes": PER_CLASS, "skipped": 1, "failed": 0}
    assert summary["images"] == {**counts, "malformed_replies": 0}
    assert summary["dropped_attributes"] == 1  # the stray image's reply named UNKNOWN
    assert summary["structured_output"] == "json_schema"
    assert summary["prompt_tokens"] > 0 and summary["estimated_cost_usd"] == "unknown"
    stats = summary["concepts"]["001"]
    assert stats["images"] == PER_CLASS - 1
    seen = sum("grey breast" in expected_visible(str(n), "001") for n in (1, 3, 4))
    assert stats["attributes"]["grey breast"]["visible"] == seen
    assert stats["attributes"]["grey breast"]["seen_rate"] == round(seen / 3, 4)
    on_disk = json.loads((out / "grounding.json").read_text())
    declared(on_disk, GroundingRecord)
    declared(on_disk["images"], GroundedImages)
    assert on_disk["concepts"] == again["concepts"] == summary["concepts"]
    lines = [json.loads(line) for line in (out / "grounding.jsonl").read_text().splitlines()]
    assert len(lines) == len(asked) + 1  # one result per image asked, plus the skipped one
    assert read_grounding_results(out / "grounding.jsonl") == {line["key"]: line for line in lines}
    for line in lines:  # each line as `finer.records` declares it
        declared(line, GroundingSkip if line["image_id"] == CORRUPT else GroundingVerdicts)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda record: {k: v for k, v in record.items() if k != "visible"}, "lacks `visible`"),
        (lambda record: {**record, "status": "maybe"}, "has status 'maybe', not ok or skipped"),
        (lambda record: {**record, "answers": []}, "`answers` is not a JSON object"),
    ],
)
def test_a_damaged_results_log_is_one_line_naming_it_and_the_fix(
    damage: Any, problem: str, built: Path, tmp_path: Path
) -> None:
    """A whole line of grounding.jsonl that is not a record is refused before any call (a torn one is
    asked again: test_ground_resumes_after_sigkill_without_duplicates)."""
    with FakeOpenAI(grounder) as server:
        ground(config(built, tmp_path / "first", server, splits=["test"]))
        records = [
            json.loads(line) for line in (tmp_path / "first" / "grounding.jsonl").read_text().splitlines()
        ]
        records[0] = damage(records[0])
        log = tmp_path / ".again.partial" / "grounding.jsonl"
        log.parent.mkdir()
        log.write_text("".join(json.dumps(record) + "\n" for record in records))
        before = server.count
        with pytest.raises(FinerError) as err:
            ground(config(built, tmp_path / "again", server, splits=["test"]))
        assert server.count == before
    message = str(err.value)
    assert message.startswith(f"{log}: the record of image {records[0]['image_id']!r} {problem}")
    assert message.endswith("; delete the file to ground those images again (cached replies cost no calls)")
    assert "\n" not in message and not (tmp_path / "again").exists()


def test_ground_without_json_schema_reads_lines(built: Path, tmp_path: Path) -> None:
    def lines(request: dict[str, Any]) -> str:
        reply = grounder(request)
        return "Here is what I see:\n" + "\n".join(f"- {a}: {v}" for a, v in reply.items())

    with FakeOpenAI(lines, json_schema=False) as server:
        summary = ground(config(built, tmp_path / "g", server, splits=["test"]))
    assert summary["structured_output"] == "text"
    rows = datasets.load_from_disk(str(tmp_path / "g"))["test"].to_list()
    assert list(datasets.load_from_disk(str(tmp_path / "g"))) == ["test"]
    for row in rows:
        assert row["attributes_visible"] == expected_visible(row["image_id"], row["concept_id"])


def test_failed_calls_keep_their_rows_marked_and_fail_the_command(
    built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two images fail (one call after retries, one cut reply also after its repair): 12 rows in, 12 out."""
    cut = "1"  # its replies are cut mid-object, twice

    def flaky(request: dict[str, Any]) -> Any:
        (url,) = image_urls(request)
        if colour_of(url) == cub_colour(int(cut)):
            return '{"hooked seabird bill": "visible", "grey br'
        if colour_of(url) == cub_colour(3):
            return Fault.server_error()
        return grounder(request)

    argv = ["ground", str(built), "--model", "test-vlm", "--max-retries", "0", "--timeout", "5"]
    with FakeOpenAI(flaky) as server:
        with pytest.raises(SystemExit) as exit_:
            main(
                [
                    *argv,
                    "--out",
                    str(tmp_path / "g"),
                    "--base-url",
                    server.url,
                    "--cache",
                    str(tmp_path / "c"),
                ]
            )
        assert exit_.value.code == 1
        assert "2 image(s) failed" in capsys.readouterr().err
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--out", str(tmp_path / "g2"), "--base-url", server.url, "--allow-failures"])
        assert exit_.value.code == 0
    for out in (tmp_path / "g", tmp_path / "g2"):
        grounded = datasets.load_from_disk(str(out))
        rows = {r["image_id"]: r for split in grounded.values() for r in split.to_list()}
        assert len(rows) == 3 * PER_CLASS
        for image_id in (cut, "3"):
            assert rows[image_id]["grounding_status"] == "failed"
            assert rows[image_id]["attributes_visible"] is None
        summary = json.loads((out / "grounding.json").read_text())
        declared(summary, GroundingRecord)
        assert summary["images"]["failed"] == 2 and summary["images"]["malformed_replies"] == 1
        assert summary["failed_calls"] == 1 and any("2 image(s) failed" in w for w in summary["warnings"])


def test_ground_refuses_a_text_only_endpoint_in_one_line(
    built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with FakeOpenAI(grounder, images=False) as server, pytest.raises(SystemExit) as exit_:
        main(
            [*("ground", str(built), "--out", str(tmp_path / "g"), "--model", "text-only")]
            + [*("--base-url", server.url, "--cache", str(tmp_path / "cache"))]
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refused the image" in err and "vision-language model" in err
    assert not (tmp_path / "g").exists()


def test_ground_resumes_after_sigkill_without_duplicates(built: Path, tmp_path: Path) -> None:
    out, cache = tmp_path / "g", tmp_path / "cache"
    with FakeOpenAI(grounder, delay=0.3) as server:
        argv = [
            *(sys.executable, "-m", "finer", "ground", str(built), "--out", str(out), "--model", "test-vlm"),
            *("--base-url", server.url, "--cache", str(cache), "--concurrency", "1"),
        ]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while server.count < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not out.exists(), "a killed run left a folder that looks finished"
        partial = tmp_path / ".g.partial" / "grounding.jsonl"
        assert partial.is_file() and 2 <= len(partial.read_text().splitlines()) < 8
        before = server.count
        summary = ground(
            GroundConfig(str(built), out, "test-vlm", base_url=server.url, cache=cache, progress=False)
        )
        total = server.count
    asked = 2 * PER_CLASS - 1
    assert summary["calls"] == total - before
    assert total <= asked + 1  # at most the call in flight at the kill is made twice
    grounded = datasets.load_from_disk(str(out))
    ids = [i for split in grounded.values() for i in split["image_id"]]
    assert len(ids) == len(set(ids)) == 3 * PER_CLASS
    records = [json.loads(line) for line in (out / "grounding.jsonl").read_text().splitlines()]
    assert len({r["key"] for r in records}) == len(records) == asked + 1
    for split in grounded.values():
        for row in split.select_columns(["image_id", "concept_id", "attributes_visible"]).to_list():
            if row["image_id"] != CORRUPT:
                assert row["attributes_visible"] == expected_visible(row["image_id"], row["concept_id"])


def test_check_cub_precision_and_recall(built: Path, cub: Path, tmp_path: Path) -> None:
    with FakeOpenAI(grounder) as server:
        summary = ground(config(built, tmp_path / "g", server, check_cub=cub))
    ids = {name: i for i, name in enumerate(ATTRIBUTES, 1)}
    phrase_id = {
        "hooked seabird bill": ids["has_bill_shape::hooked_seabird"],
        "brown wing": ids["has_wing_color::brown"],
        "white wing": ids["has_wing_color::white"],
        "grey breast": ids["has_breast_color::grey"],
    }
    counts: dict[str, dict[str, int]] = {}
    for n in range(1, 2 * PER_CLASS + 1):
        if str(n) == CORRUPT:
            continue
        concept = f"{(n - 1) // PER_CLASS + 1:03d}"
        seen = expected_visible(str(n), concept)
        for phrase in REQUIRED[concept]:
            group = {"hooked seabird bill": "bill shape", "grey breast": "breast color"}.get(
                phrase, "wing color"
            )
            truth, said = is_present(n, phrase_id[phrase]), phrase in seen
            outcome = ("tp" if truth else "fp") if said else ("fn" if truth else "tn")
            for name in (group, "overall"):
                counts.setdefault(name, {"tp": 0, "fp": 0, "fn": 0, "tn": 0})[outcome] += 1
    check = summary["check_cub"]
    assert check["unmapped_phrases"] == [] and check["pairs_without_label"] == 0
    assert check["images"] == 2 * PER_CLASS - 1
    for name, c in counts.items():
        scores = check["overall"] if name == "overall" else check["groups"][name]
        assert {k: scores[k] for k in c} == c, name
        assert scores["precision"] == round(c["tp"] / (c["tp"] + c["fp"]), 4)
        assert scores["recall"] == round(c["tp"] / (c["tp"] + c["fn"]), 4)
    assert set(check["groups"]) == {"bill shape", "wing color", "breast color"}
    report = (tmp_path / "g" / "report.md").read_text()
    assert "CUB-200-2011" in report and "| bill shape |" in report


# --- exemplar images in attribute extraction (--extractor vlm) ----------------------------------------

SPECIES = {"Cerulean_Warbler": 7, "Magnolia_Warbler": 2}  # train images per class
PAGES = {
    name.replace("_", " "): FakePage.article(
        f"The {name} is a small songbird.",
        {"Description": f"The {name} has a black crown and white wing bars."},
    )
    for name in SPECIES
}


def exemplar_colour(species: int, index: int) -> tuple[int, int, int]:
    return (20 * index + 10, 100 * species + 20, 50)


@pytest.fixture
def birds(tmp_path: Path) -> Path:
    root = tmp_path / "birds"
    for s, (name, n) in enumerate(SPECIES.items()):
        for split, count in (("train", n), ("test", 1)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (12, 12), exemplar_colour(s, i)).save(folder / f"{i}.png")
    return root


def extraction_reply(request: dict[str, Any]) -> Any:
    """Coarse-label prompts end with "Group:"; attribute replies say how many images came along."""
    if "Group:" in json.dumps(request["messages"]):
        return "Warbler"
    return {"required": ["black crown", f"{len(image_urls(request))} wing bars"], "likely": []}


def build_birds(birds: Path, out: Path, wiki: FakeMediaWiki, server: FakeOpenAI, **extra: Any) -> dict:
    options = KnowledgeOptions(
        extractor="vlm",
        model="test-vlm",
        base_url=server.url,
        wiki_api=wiki.url,
        cache=out.parent / "cache",
        **extra,
    )
    config = BuildConfig("imagefolder", out, root=birds, knowledge=True, overwrite=True)
    config.knowledge_options = options
    return build(config)


def attribute_requests(server: FakeOpenAI) -> list[dict[str, Any]]:
    return [r["json"] for r in server.requests if "Group:" not in json.dumps(r["json"]["messages"])]


def test_vlm_extractor_sends_spread_exemplars_and_rekeys_on_change(birds: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with FakeMediaWiki(PAGES) as wiki, FakeOpenAI(extraction_reply) as server:
        summary = build_birds(birds, out, wiki, server)
        first = attribute_requests(server)
        # a train image that is not an exemplar changes: same requests, all from cache
        Image.new("RGB", (12, 12), (0, 0, 0)).save(birds / "train" / "Cerulean_Warbler" / "1.png")
        build_birds(birds, out, wiki, server)
        assert len(attribute_requests(server)) == len(first)
        # an exemplar changes: that concept's key changes, one new call; the other concept is cached
        Image.new("RGB", (12, 12), (250, 250, 250)).save(birds / "train" / "Cerulean_Warbler" / "4.png")
        again = build_birds(birds, out, wiki, server)
        after = attribute_requests(server)
    by_concept = {
        next(name for name in SPECIES if name.replace("_", " ") in json.dumps(r["messages"])): r
        for r in first
    }
    cerulean = [colour_of(url) for url in image_urls(by_concept["Cerulean_Warbler"])]
    assert cerulean == [exemplar_colour(0, i) for i in (0, 4, 6)]  # 3 of 7, spread, first and last in
    assert [colour_of(u) for u in image_urls(by_concept["Magnolia_Warbler"])] == [
        exemplar_colour(1, i) for i in (0, 1)
    ]
    assert len(after) == len(first) + 1
    changed = [colour_of(url) for url in image_urls(after[-1])]
    assert changed == [exemplar_colour(0, 0), (250, 250, 250), exemplar_colour(0, 6)]
    knowledge = summary["knowledge"]
    declared(knowledge, BuildKnowledge)
    assert knowledge["extractor"] == "vlm" and knowledge["attributes"]["extractor"] == "vlm:test-vlm"
    assert knowledge["attributes"]["exemplars"]["images"] == {
        "Cerulean_Warbler": [f"train/Cerulean_Warbler/{i}.png" for i in (0, 4, 6)],
        "Magnolia_Warbler": [f"train/Magnolia_Warbler/{i}.png" for i in (0, 1)],
    }
    assert again["knowledge"]["attributes"]["calls"] == 1
    concepts = {c.concept_id: c for c in iter_concepts(out / "concepts.jsonl")}
    assert concepts["Magnolia_Warbler"].attributes.required == ["black crown", "2 wing bars"]
    assert concepts["Cerulean_Warbler"].attributes.extractor == "vlm:test-vlm"


def test_vlm_extractor_falls_back_to_text_when_images_are_refused(
    birds: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with FakeMediaWiki(PAGES) as wiki, FakeOpenAI(extraction_reply, images=False) as server:
        summary = build_birds(birds, tmp_path / "out", wiki, server)
    knowledge = summary["knowledge"]
    declared(knowledge, BuildKnowledge)
    assert knowledge["extractor"] == "llm"
    fallback = knowledge["attributes"]["fallback"]
    assert fallback["requested"] == "vlm" and fallback["used"] == "llm" and "image" in fallback["reason"]
    assert sum("text extractor" in w for w in summary["warnings"]) == 1
    assert capsys.readouterr().err.count("text extractor (llm) for the whole build") == 1
    concepts = list(iter_concepts(tmp_path / "out" / "concepts.jsonl"))
    assert {c.attributes.extractor for c in concepts} == {"llm:test-vlm"}
    assert all(c.attributes.required == ["black crown", "0 wing bars"] for c in concepts)


class Strip(Source):
    """One concept whose records are coloured by position; `broken` positions hold garbage bytes."""

    name = "strip"
    layout = "in memory"

    def __init__(self, count: int, broken: tuple[int, ...] = ()) -> None:
        self.count, self.broken = count, broken

    def splits(self) -> list[str]:
        return ["train"]

    def concepts(self) -> list[Concept]:
        return [Concept(concept_id="a", fine=["A"], superordinate="Thing")]

    def records(self, split: str) -> Any:
        for i in range(self.count):
            buffer = io.BytesIO()
            Image.new("RGB", (4, 4), (10 * (i % 25), 10 * (i // 25), 0)).save(buffer, format="PNG")
            data = GARBAGE if i in self.broken else buffer.getvalue()
            yield ImageRecord(image_id=str(i), concept_id="a", data=data)


@pytest.mark.parametrize(
    ("count", "k", "broken", "picked"),
    [
        (20, 3, (), [0, 8, 16]),
        (100, 4, (), [0, 32, 64, 96]),
        (2, 3, (), [0, 1]),
        (20, 3, (8,), [0, 4, 16]),
    ],
)
def test_exemplars_are_spread_over_the_class(count: int, k: int, broken: tuple, picked: list[int]) -> None:
    source = Strip(count, broken)
    exemplars = Exemplars(source, source.concepts(), k, 768)
    colours = [r // 10 + 25 * (g // 10) for r, g, _ in map(colour_of, exemplars("a"))]
    assert colours == picked
    assert exemplars.chosen == {"a": [str(i) for i in picked]}
    assert exemplars.unreadable == [str(i) for i in broken]


# --- a local model (--backend hf) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finer.testing import build_tiny_vlm

    return build_tiny_vlm("llava", tmp_path_factory.mktemp("llava"))


def test_hf_backend_grounds_and_extracts_with_a_tiny_model(
    built: Path, birds: Path, tiny_llava: Path, tmp_path: Path
) -> None:
    out = tmp_path / "g"
    local = GroundConfig(str(built), out, str(tiny_llava), backend="hf", splits=["test"], limit=2)
    local.concurrency, local.max_new_tokens, local.progress = 2, 8, False
    # random weights never stop within 8 tokens: every reply is cut ("length"), so none is an answer,
    # also after its repair turn, and nothing is written
    with pytest.raises(FinerError, match="every request failed, e.g. reply cut off"):
        ground(local)
    assert not out.exists()
    with FakeMediaWiki(PAGES) as wiki:
        options = KnowledgeOptions(extractor="vlm", backend="hf", model=str(tiny_llava), wiki_api=wiki.url)
        options.cache, options.concurrency, options.exemplars = tmp_path / "cache", 2, 2
        config = BuildConfig(
            "imagefolder", tmp_path / "b", root=birds, knowledge=True, knowledge_options=options
        )
        built_birds = build(config)
    attributes = built_birds["knowledge"]["attributes"]
    assert attributes["extractor"] == f"vlm:{tiny_llava}"
    sent = {cid: len(ids) for cid, ids in attributes["exemplars"]["images"].items()}
    assert sent == {"Cerulean_Warbler": 2, "Magnolia_Warbler": 2}
    assert attributes["calls"] >= 2 and built_birds["coarse_sources"] == {"rules": 2}


def test_overwrite_crashed_mid_swap_keeps_the_earlier_output(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed as the new output goes in, the earlier one is whole again for the next run (finer.run_folder);
    a second run into a folder being written is refused."""
    out = tmp_path / "g"
    rename = Path.rename

    def crash(self: Path, target: Path) -> Path:
        if self.name == ".g.partial":
            raise KeyboardInterrupt  # what SIGKILL would leave: nothing after this runs
        return rename(self, target)

    with FakeOpenAI(grounder) as server:
        ground(config(built, out, server, splits=["test"]))
        before = (out / "grounding.json").read_text()
        with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
            patch.setattr(Path, "rename", crash)
            ground(config(built, out, server, splits=["test"], overwrite=True))
        with pytest.raises(FinerError, match="not empty; pass --overwrite"):
            ground(config(built, out, server, splits=["test"]))
        assert (out / "grounding.json").read_text() == before
        with OutputLock(out), pytest.raises(FinerError, match="being written by another run"):
            ground(config(built, out, server, splits=["test"], overwrite=True))
