"""`--dry-run` and `--batch` of `build` (attributes and coarse labels), `--dry-run` of `eval --backend openai`
(issue 18): the projection counts the calls the real run then makes; a batched build sends no call."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_evaluate import ROWS, Scripted, demo  # noqa: F401 - fixtures used by name
from test_knowledge_build import PAGES, SPECIES, birds, coarse_answer  # noqa: F401
from test_scale import assert_back_to_back, run_main, slowed

from finer.records import read_metrics_file
from finer.testing.fake_batches import FakeBatches
from finer.testing.fake_mediawiki import FakeMediaWiki
from finer.testing.fake_openai import FakeOpenAI, billed_tokens
from tests.cli_helpers import eval_argv
from tests.records_check import checked_predictions


def build_argv(root: Path, out: Path, wiki: FakeMediaWiki, llm: FakeOpenAI, cache: Path) -> list[str]:
    return [
        *("build", "imagefolder", "--root", str(root), "--out", str(out), "--knowledge"),
        *("--extractor", "llm", "--model", "gpt-4o-mini", "--base-url", llm.url),
        *("--wiki-api", wiki.url, "--cache", str(cache)),
    ]


def projected(printed: str, template: str) -> tuple[int, int]:
    """Calls and input tokens (text + image) of one step's dry-run line."""
    line = next(line for line in printed.splitlines() if f"{template} @" in line)
    calls = int(line.split(": ", 1)[1].split(" calls")[0])
    text, image = line.split("input ", 1)[1].split(" image tokens")[0].split(" text + ")
    return calls, int(text.rstrip("*")) + int(image)


def test_build_dry_run_counts_both_steps_then_the_real_build_matches(
    birds: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with FakeMediaWiki(PAGES) as wiki, FakeOpenAI(coarse_answer, count_tokens=billed_tokens) as llm:
        argv = build_argv(birds, tmp_path / "out", wiki, llm, tmp_path / "cache")
        assert run_main([*argv, "--dry-run"]) == 0
        assert llm.count == 0 and not (tmp_path / "out").exists()
        printed = capsys.readouterr().out
        assert run_main(argv) == 0
        billed = sum(
            int(json.loads(path.read_text())["value"]["prompt_tokens"])
            for path in (tmp_path / "cache" / "llm").rglob("*.json")
        )
    coarse, attributes = projected(printed, "coarse_label"), projected(printed, "extract_attributes")
    assert coarse[0] == attributes[0] == len(SPECIES) and llm.count == 2 * len(SPECIES)
    # both count with gpt-4o-mini's tokenizer; the projection adds OpenAI's chat framing the server omits
    assert abs(coarse[1] + attributes[1] - billed) <= 0.10 * billed, (coarse, attributes, billed)
    assert "* text" not in printed, "gpt-4o-mini's text tokens were estimated, not counted"


def test_build_batch_sends_no_call(birds: Path, tmp_path: Path) -> None:  # noqa: F811
    batches = FakeBatches()
    with FakeMediaWiki(PAGES) as wiki, FakeOpenAI(coarse_answer, batches=batches) as llm:
        argv = build_argv(birds, tmp_path / "out", wiki, llm, tmp_path / "cache")
        assert run_main([*argv, "--batch"]) == 0
        assert llm.count == 0
    report = json.loads((tmp_path / "out" / "build.json").read_text())["knowledge"]
    assert report["attributes"]["cache_hits"] == len(SPECIES)
    batch = json.loads((tmp_path / "out" / "build.json").read_text())["batch"]
    assert batch["completed"] == batch["requests"] == 2 * len(SPECIES) and batches.created


def test_eval_dry_run_counts_the_questions_the_real_run_asks(
    demo: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with FakeOpenAI(Scripted(demo)) as server:
        argv = eval_argv(demo, tmp_path / "e", server.url)
        assert run_main([*argv, "--dry-run"]) == 0
        assert server.count == 0
        calls, _ = projected(capsys.readouterr().out, "direct")
        assert run_main(argv) == 0
        assert server.count == calls == 3 * ROWS


def test_eval_over_two_endpoints_records_its_calls_per_endpoint(demo: Path, tmp_path: Path) -> None:  # noqa: F811
    """metrics.json holds the eval's endpoint usage: calls, tokens, cost, and calls per endpoint."""
    with FakeOpenAI(Scripted(demo), delay=0.05) as a, FakeOpenAI(Scripted(demo), delay=0.05) as b:
        argv = eval_argv(demo, tmp_path / "e", f"{a.url},{b.url}", "--concurrency", "2")
        assert run_main(argv) == 0
        served = {a.url + "/": a.count, b.url + "/": b.count}
    # two workers per slot, yet never more than --concurrency calls at an endpoint; each kept full
    assert a.max_in_flight == b.max_in_flight == 2
    keys = [record["key"] for record in checked_predictions(tmp_path / "e")]
    assert len(keys) == len(set(keys)) == 3 * ROWS
    usage = read_metrics_file(tmp_path / "e")["usage"]
    assert usage["calls"] == 3 * ROWS == sum(served.values()) and min(served.values()) > 0
    assert usage["calls_per_endpoint"] == served and usage["prompt_tokens"] > 0


def test_eval_keeps_its_endpoint_slot_busy_while_workers_prepare_images(
    demo: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`eval --backend openai` as `ground` (two workers per slot): at --concurrency 1 the next question's
    image (0.3 s to encode here) is prepared while a call is in flight, and the calls never overlap."""
    from finer.models import backends

    slowed(monkeypatch, backends, "_data_url", 0.3)
    with FakeOpenAI(Scripted(demo), delay=0.4) as server:
        argv = eval_argv(demo, tmp_path / "e", server.url, "--concurrency", "1", "--level", "fine")
        assert run_main([*argv, "--limit", "6"]) == 0
    assert_back_to_back(server, 6, call_s=0.4, prepare_s=0.3)
    assert len(checked_predictions(tmp_path / "e")) == 6


def test_eval_dry_run_of_a_resumed_run_projects_only_the_unanswered(
    demo: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The answers already in --out's predictions.jsonl are neither projected nor asked again."""
    with FakeOpenAI(Scripted(demo)) as server:
        argv = eval_argv(demo, tmp_path / "e", server.url)
        assert run_main([*argv, "--limit", "4"]) == 0
        asked = server.count
        capsys.readouterr()
        assert run_main([*argv, "--dry-run"]) == 0
        assert server.count == asked
        calls, _ = projected(capsys.readouterr().out, "direct")
        assert run_main(argv) == 0
        assert calls == server.count - asked == 3 * ROWS - asked > 0


def test_dry_run_refuses_a_local_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A local model (--backend hf) makes no endpoint call to project or price: one line, nothing run."""
    argv = ["build", "demo", "--out", str(tmp_path / "out"), "--extractor", "vlm", "--backend", "hf"]
    assert run_main([*argv, "--model", "some/local-vlm", "--dry-run"]) == 2
    assert "need --backend openai" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
