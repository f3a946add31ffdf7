"""The evaluation harness: tiny local models in every mode, a fake OpenAI-compatible server with scripted
answers (so the metrics are known exactly), faults, resume after a crash or a kill, reports, compare, and
one-line errors for bad input. Only the far end of the wire is fake."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import pytest

from finer.data.build import BuildConfig, build
from finer.errors import FinerError
from finer.eval.engine import EvalConfig, evaluate
from finer.eval.report import compare
from finer.eval.tasks import EvalPlan, choice_options
from finer.models.backends import Generation, HFBackend, OpenAIBackend
from finer.models.images import image_data_url
from finer.prompts import render
from finer.records import (
    ClassMetrics,
    LevelMetrics,
    MetricsRecord,
    RunMetrics,
    UsageCounts,
    read_metrics_file,
)
from finer.run_folder import OutputLock
from finer.testing import tiny_vlm_path, unavailable_reason
from finer.testing.fake_openai import FakeOpenAI, Fault
from tests.cli_helpers import run_cli
from tests.records_check import checked_predictions, declared

ROWS = 16  # the demo's test split at two images per class: eight species in four look-alike pairs


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "demo"
    build(BuildConfig(source="demo", out=out, splits=["test"], limit_per_class=2))
    return out


@pytest.fixture(autouse=True)
def _no_endpoint_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


# --- local models -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["direct", "attrseek", "probe", "choice", "finer"])
def test_hf_every_mode(mode: str, demo: Path, tmp_path: Path) -> None:
    config = EvalConfig(
        dataset=str(demo),
        out=tmp_path,
        model=str(tiny_vlm_path("llava")),
        mode=mode,
        limit=4,
        max_new_tokens=4,
    )
    result = evaluate(config)
    levels = ["coarse", "fine"] if mode in ("choice", "finer") else ["superordinate", "coarse", "fine"]
    assert result["asked"] == result["answered"] == 4 * len(levels) and result["failed"] == 0
    saved = checked_predictions(tmp_path)
    assert Counter(r["level"] for r in saved) == dict.fromkeys(levels, 4)
    assert all(isinstance(r["prediction"], str) and isinstance(r["truncated"], bool) for r in saved)
    if mode == "attrseek":
        assert all("attributes" in r and "attributes_truncated" in r for r in saved)
    if mode == "choice":
        assert result["warnings"] == ["choice: only coarse, fine offer two or more labels to choose from"]
        for r in saved:
            gold = r["fine"][0] if r["level"] == "fine" else r["coarse"][0]
            assert r["options"].count(gold) == 1 and r["options"][ord(r["answer"]) - 65] == gold
    # A random tiny model rarely says its end token: answers cut at the limit are kept, scored and flagged.
    flagged = sum(r["truncated"] for r in saved)
    assert flagged > 0
    assert sum(level["truncated"] for level in result["runs"][0]["levels"].values()) == flagged
    assert {p.name for p in tmp_path.iterdir()} >= {
        "predictions.jsonl",
        "metrics.json",
        "report.md",
        "cliff.png",
    }


@pytest.mark.parametrize("family", ["llava", "idefics3", "qwen2_vl"])
def test_batched_and_unbatched_greedy_answers_agree(family: str, demo: Path, tmp_path: Path) -> None:
    if reason := unavailable_reason(family):
        pytest.skip(reason)
    answers = []
    for batch_size in (1, 8):
        out = tmp_path / str(batch_size)
        config = EvalConfig(
            dataset=str(demo),
            out=out,
            model=str(tiny_vlm_path(family)),
            mode="attrseek",
            limit=6,
            batch_size=batch_size,
            max_new_tokens=6,
        )
        evaluate(config)
        answers.append({r["key"]: (r["attributes"], r["prediction"]) for r in checked_predictions(out)})
    assert len(answers[0]) == 18 and answers[0] == answers[1]


def test_hf_resume_after_a_crash(demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that dies mid-way keeps what it answered; the next asks only for the rest, no duplicates."""
    config = EvalConfig(
        dataset=str(demo), out=tmp_path, model=str(tiny_vlm_path("llava")), batch_size=4, max_new_tokens=3
    )
    generate = HFBackend.generate
    calls = []

    def dying(self: HFBackend, *args: Any) -> Any:
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("out of memory")
        return generate(self, *args)

    monkeypatch.setattr(HFBackend, "generate", dying)
    with pytest.raises(RuntimeError):
        evaluate(config)
    assert len(checked_predictions(tmp_path)) == 12  # three batches of four, each flushed as it finished
    with open(tmp_path / "predictions.jsonl", "a") as fh:
        fh.write('{"key": "torn by the crash", "predic')  # a half-written last line
    monkeypatch.setattr(HFBackend, "generate", generate)
    result = evaluate(config)
    keys = [r["key"] for r in checked_predictions(tmp_path)]
    assert result["asked"] == 3 * ROWS - 12 and len(keys) == len(set(keys)) == 3 * ROWS


def test_adapter_and_its_base(demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    llava = str(tiny_vlm_path("llava"))
    base = AutoModelForImageTextToText.from_pretrained(llava)
    get_peft_model(
        base, LoraConfig(r=4, target_modules=r".*language_model.*\.q_proj", init_lora_weights=False)
    ).save_pretrained(tmp_path / "adapter")
    common = ["eval", "--dataset", str(demo), "--limit", "2", "--level", "fine", "--max-new-tokens", "2"]
    out = tmp_path / "eval"
    code, stdout, _ = run_cli(
        [*common, "--model", llava, "--adapter", str(tmp_path / "adapter"), "--out", str(out)], capsys
    )
    assert code == 0 and "direct: modified EM fine" in stdout
    run_cli([*common, "--model", llava, "--out", str(out)], capsys)
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(run["label"] for run in metrics["runs"]) == ["adapter direct", "no adapter direct"]

    idefics3 = str(tiny_vlm_path("idefics3"))  # built first: its progress bars are not the command's output
    capsys.readouterr()
    code, _, err = run_cli(
        [
            *common,
            "--model",
            idefics3,
            "--adapter",
            str(tmp_path / "adapter"),
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 2 and f"was trained on {llava}, not on --model" in err and len(err.splitlines()) == 1


# --- questions ----------------------------------------------------------------------------------------

AIRCRAFT = [
    {
        "concept_id": "a320",
        "superordinate": "Airplane",
        "coarse": ["Airbus"],
        "fine": ["A320", "A320 family"],
    },
    {"concept_id": "a380", "superordinate": "Airplane", "coarse": ["Airbus"], "fine": ["A380"]},
    {"concept_id": "737", "superordinate": "Airplane", "coarse": ["Boeing"], "fine": ["737-800", "737"]},
    {"concept_id": "747", "superordinate": "Airplane", "coarse": ["Boeing"], "fine": ["747-400"]},
    {"concept_id": "dc3", "superordinate": "Airplane", "coarse": ["Douglas"], "fine": ["DC-3"]},
    {"concept_id": "owl", "superordinate": "Bird", "coarse": ["Owl"], "fine": ["Barn Owl"]},
    {"concept_id": "tern", "superordinate": "Bird", "coarse": ["Tern"], "fine": ["Common Tern"]},
]


def row_of(concept: dict[str, Any], image_id: str = "img-1") -> dict[str, Any]:
    return {**concept, "image_id": image_id, "source": "fgvc-aircraft", "attributes_required": ["winglets"]}


def plan(mode: str, *, gold_parent: bool = False, choices: int = 5, seed: int = 0) -> EvalPlan:
    run = {"mode": mode, "gold_parent": gold_parent, "choices": choices, "seed": seed}
    return EvalPlan(run=run, concepts=AIRCRAFT, images=lambda index: None)  # type: ignore[arg-type,return-value]


def text_of(messages: list[dict]) -> str:
    return "\n".join(b.get("text", "<image>") for m in messages for b in m["content"])


def test_prompts_per_mode_gold_parent_and_closed_lists() -> None:
    row = row_of(AIRCRAFT[2])
    coarse = plan("direct", gold_parent=True).task(0, row, "coarse")
    assert "What kind of Airplane" in text_of(coarse.first)
    assert "Choose one of: Airbus, Boeing, Douglas, Owl, Tern." in text_of(coarse.first)  # the manufacturers
    fine = plan("direct", gold_parent=True).task(0, row, "fine")
    assert "specific name of the Boeing" in text_of(fine.first) and "Choose one of" not in text_of(fine.first)
    assert "kind of Airplane" not in text_of(plan("direct").task(0, row, "coarse").first)

    seek = plan("attrseek").task(0, row, "coarse")
    assert [m["role"] for m in seek.first] == ["user"] and seek.image is not None
    assert len(seek.followups) == 1 and seek.attributes_turn == 0
    second = seek.followups[0](["Attributes: winglets; twin engines"])
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[1]["content"][0]["text"] == "Attributes: winglets; twin engines"

    probe = plan("probe").task(0, row, "fine")
    assert probe.image is None and "<image>" not in text_of(probe.first)
    assert "- winglets" in text_of(probe.first) and 'from the group "Boeing"' in text_of(probe.first)


def test_finer_mode_replays_the_training_conversation_about_the_models_own_group() -> None:
    row = row_of(AIRCRAFT[2])  # a Boeing 737-800
    coarse, fine = (plan("finer").task(0, row, level) for level in ("coarse", "fine"))
    assert coarse.first == fine.first and not coarse.followups and coarse.image is not None
    assert [m["role"] for m in fine.first] == ["user"] and "What kind of Airplane" in text_of(fine.first)
    said = ["It is a jet. Answer: Airbus", "Attributes: winglets; twin engines"]
    second, third = fine.followups[0](said[:1]), fine.followups[1](said)
    assert [m["role"] for m in third] == ["user", "assistant", "user", "assistant", "user"]
    assert third[:3] == second and [m["content"][0]["text"] for m in third[1::2]] == said
    # exactly the training template's questions, asked about the group the model named
    training = render("train_finer", superordinate="Airplane", coarse="Airbus", fine="", attributes=[])
    assert third[::2] == [m for m in training if m["role"] == "user"]
    assert fine.attributes_turn == 1
    gold = plan("finer", gold_parent=True).task(0, row, "fine").followups[1](said)
    assert "Look closely at the Boeing" in text_of(gold) and "Airbus" not in text_of(gold[2:])
    assert plan("finer").levels("all") == ["coarse", "fine"]
    with pytest.raises(FinerError, match="names the superordinate"):
        plan("finer").levels("superordinate")


def test_choice_distractors_siblings_first_seeded_gold_once() -> None:
    row = row_of(AIRCRAFT[2])  # 737-800, a Boeing: its one sibling is the 747
    for image in range(20):
        options, answer = choice_options({**row, "image_id": f"i{image}"}, "fine", AIRCRAFT, 3, seed=0)
        assert len(options) == 3 and options.count("737-800") == 1 and options[ord(answer) - 65] == "737-800"
        assert "747-400" in options  # the hard negative always comes first
        assert not {"Barn Owl", "Common Tern"} & set(options)  # same superordinate before any other
    fives = {tuple(choice_options(row, "fine", AIRCRAFT, 5, seed=s)[0]) for s in range(10)}
    assert all(set(f) == {"737-800", "747-400", "A320", "A380", "DC-3"} for f in fives) and len(fives) > 1
    assert choice_options(row, "fine", AIRCRAFT, 5, seed=3) == choice_options(
        row, "fine", AIRCRAFT, 5, seed=3
    )
    assert len(choice_options(row, "fine", AIRCRAFT, 26, seed=0)[0]) == 7  # fewer labels than asked for
    alias = {"concept_id": "x", "superordinate": "Airplane", "coarse": ["Airbus"], "fine": ["a320-family"]}
    for seed in range(10):  # a label the row accepts ("A320 family") is never a distractor
        options, _ = choice_options(row_of(AIRCRAFT[0]), "fine", [*AIRCRAFT, alias], 26, seed=seed)
        assert "a320-family" not in options and options.count("A320") == 1 and len(options) == 7
    coarse, _ = choice_options(row, "coarse", AIRCRAFT, 3, seed=0)
    assert "Boeing" in coarse and set(coarse) <= {"Airbus", "Boeing", "Douglas"}
    with pytest.raises(FinerError, match="single superordinate label"):
        EvalPlan(run={"mode": "choice"}, concepts=AIRCRAFT[:5], images=None).levels("superordinate")


# --- an OpenAI-compatible endpoint ---------------------------------------------------------------------


class Scripted:
    """Answers as a model that knows every image (looked up by its data URL) and is right by a fixed rule:
    the superordinate always, the coarse label for the first image of each species, the fine label for the
    first image of each warbler (sup 16/16, coarse 8/16, fine 2/16)."""

    def __init__(self, demo: Path) -> None:
        split = datasets.load_from_disk(str(demo))["test"]
        self.rows = {image_data_url(row["image"]): row for row in split}
        self.broken: set[str] = set()

    def __call__(self, request: dict[str, Any]) -> Any:
        messages = request["messages"]
        url = next(b["image_url"]["url"] for b in messages[0]["content"] if b["type"] == "image_url")
        row = self.rows[url]
        first = row["image_id"].endswith("/000")
        question = messages[-1]["content"]
        question = question if isinstance(question, str) else " ".join(b.get("text", "") for b in question)
        if "visible features" in question:
            return "Attributes: blue back; white belly"
        if row["image_id"] in self.broken:
            return Fault(status=500, message="internal server error", headers=(("retry-after-ms", "1"),))
        if "general kind" in question:
            return "It is a bird. Answer: Bird"
        if "group" in question:
            return f"Answer: {row['coarse'][0] if first else 'Sparrow'}"
        right = first and row["coarse"][0] == "Warbler"
        return f"Answer: {row['fine'][0] if right else 'Song Sparrow'}"


EXPECTED = {"superordinate": 1.0, "coarse": 0.5, "fine": 0.125}


def test_openai_scripted_metrics_exact(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with FakeOpenAI(Scripted(demo)) as server:
        argv = [
            "eval",
            "--dataset",
            str(demo),
            "--backend",
            "openai",
            "--model",
            "vlm-1",
            "--base-url",
            server.url,
        ]
        code, stdout, _ = run_cli([*argv, "--out", str(tmp_path), "--concurrency", "4"], capsys)
        assert code == 0 and "direct: modified EM superordinate 1.000 (n=16)" in stdout
        assert server.count == 3 * ROWS and server.max_in_flight <= 4
        request = server.requests[0]["json"]
        assert request["model"] == "vlm-1" and request["temperature"] == 0
        image = next(b for b in request["messages"][0]["content"] if b["type"] == "image_url")
        assert image["image_url"]["url"].startswith("data:image/jpeg;base64,")
        # a second run finds everything done and makes no call
        code, stdout, _ = run_cli([*argv, "--out", str(tmp_path)], capsys)
        assert code == 0 and "asked 0" in stdout and server.count == 3 * ROWS
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    (run,) = metrics["runs"]
    assert {level: v["em"] for level, v in run["levels"].items()} == EXPECTED
    assert run["levels"]["fine"]["per_class"]["Cerulean Warbler"] == {
        "count": 2, "em": 0.5, "strict_em": 0.5, "f1": 0.5
    }  # fmt: skip
    assert run["levels"]["superordinate"]["strict_em"] == 1.0 and run["levels"]["coarse"]["f1"] == 0.5
    report = (tmp_path / "report.md").read_text()
    assert (
        "| direct | 1.000 | 0.500 | 0.125 |" in report
        and "![superordinate → coarse → fine](cliff.png)" in report
    )
    assert (tmp_path / "cliff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_openai_attrseek_keeps_its_own_attributes(demo: Path, tmp_path: Path) -> None:
    with FakeOpenAI(Scripted(demo)) as server:
        config = EvalConfig(
            dataset=str(demo),
            out=tmp_path,
            model="vlm-1",
            backend="openai",
            base_url=server.url,
            mode="attrseek",
        )
        result = evaluate(config)
    # one first turn per image, shared by its three levels; then one second turn per level
    assert server.count == ROWS + 3 * ROWS
    seconds = [r["json"]["messages"] for r in server.requests if len(r["json"]["messages"]) == 3]
    assert all(
        m[1] == {"role": "assistant", "content": "Attributes: blue back; white belly"} for m in seconds
    )
    assert all(r["attributes"] == "Attributes: blue back; white belly" for r in checked_predictions(tmp_path))
    assert {level: v["em"] for level, v in result["runs"][0]["levels"].items()} == EXPECTED


def test_openai_finer_mode_asks_about_the_models_own_group(demo: Path, tmp_path: Path) -> None:
    with FakeOpenAI(Scripted(demo)) as server:
        config = EvalConfig(
            dataset=str(demo),
            out=tmp_path,
            model="vlm-1",
            backend="openai",
            base_url=server.url,
            mode="finer",
        )
        result = evaluate(config)
    # one first turn per image, shared by its two levels; then two more turns at the fine level
    assert server.count == ROWS + 2 * ROWS
    levels = result["runs"][0]["levels"]
    assert {level: v["em"] for level, v in levels.items()} == {"coarse": 0.5, "fine": 0.125}
    asked = [r["json"]["messages"] for r in server.requests if len(r["json"]["messages"]) == 3]
    groups = Counter(
        m[2]["content"].split(" in this image")[0].removeprefix("Look closely at the ") for m in asked
    )
    assert groups == {"Sparrow": ROWS // 2, "Chickadee": 2, "Oriole": 2, "Tanager": 2, "Warbler": 2}
    fine = [r for r in checked_predictions(tmp_path) if r["level"] == "fine"]
    assert all(r["attributes"] == "Attributes: blue back; white belly" and len(r["turns"]) == 2 for r in fine)


def test_openai_faults_retry_and_failed_calls_are_asked_again(demo: Path, tmp_path: Path) -> None:
    scripted = Scripted(demo)
    config = EvalConfig(dataset=str(demo), out=tmp_path, model="m", backend="openai", limit=4, level="fine")
    with FakeOpenAI(scripted) as server:
        config.base_url = server.url
        server.inject(Fault.rate_limited(0.3), Fault(status=500, headers=(("retry-after-ms", "1"),)))
        started = time.perf_counter()
        result = evaluate(config)
        assert time.perf_counter() - started >= 0.3  # Retry-After honoured by the shared client
        assert result["answered"] == 4 and server.count == 4 + 2

        scripted.broken = {"baltimore-oriole/test/000"}
        config.limit = 8
        result = evaluate(config, backend=OpenAIBackend("m", server.url, max_retries=0))
        assert result["answered"] == 3 and result["failed"] == 1
        assert (
            "1 of 4 requests failed (e.g. baltimore-oriole/test/000 (fine): HTTP 500" in result["warnings"][0]
        )
        assert "baltimore-oriole/test/000" not in {r["image_id"] for r in checked_predictions(tmp_path)}

        scripted.broken = set()
        before = server.count
        result = evaluate(config)
    assert result["asked"] == 1 and server.count == before + 1 and len(checked_predictions(tmp_path)) == 8


def test_own_prompts_and_original_rules(demo: Path, tmp_path: Path) -> None:
    """--prompts-dir swaps the template (and its hash, so old answers are not reused); --finer-original
    scores with the original rules, where a gold inside a longer word counts ("warbler" in "warblers")."""
    from finer.prompts import template_source

    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "direct.jinja").write_text(
        template_source("direct").replace('after "Answer:".', 'after "Answer:". Be brief.')
    )
    with FakeOpenAI(lambda request: "Answer: the Cerulean Warblers") as server:
        base = EvalConfig(
            dataset=str(demo),
            out=tmp_path / "a",
            model="m",
            backend="openai",
            base_url=server.url,
            limit=4,
            level="fine",
        )
        ours = evaluate(base)
        base.prompts_dir, base.finer_original = prompts, True
        original = evaluate(base)
    assert "Be brief." in server.requests[-1]["json"]["messages"][0]["content"][-1]["text"]
    assert "Be brief." not in server.requests[0]["json"]["messages"][0]["content"][-1]["text"]
    assert original["asked"] == 4 and original["rules"] == "finer-original"
    assert [run["levels"]["fine"]["em"] for run in ours["runs"]] == [0.0]
    assert [run["levels"]["fine"]["em"] for run in original["runs"]] == [0.5, 0.5]  # both templates' runs


def test_resume_after_sigkill(demo: Path, tmp_path: Path) -> None:
    """A run killed with SIGKILL loses at most what was in flight; the re-run completes it exactly."""
    scripted = Scripted(demo)
    with FakeOpenAI(scripted, delay=0.05) as server:
        argv = [
            *("eval", "--dataset", str(demo), "--out", str(tmp_path), "--backend", "openai"),
            *("--model", "m", "--base-url", server.url, "--concurrency", "2"),
        ]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        child = subprocess.Popen([sys.executable, "-m", "finer", *argv], env=env, stderr=subprocess.DEVNULL)
        predictions = tmp_path / "predictions.jsonl"
        deadline = time.monotonic() + 60
        while not (predictions.exists() and predictions.read_text().count("\n") >= 8):
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait()
        kept = {r["key"] for r in checked_predictions(tmp_path)}
        assert 8 <= len(kept) < 3 * ROWS
        before = server.count
        result = evaluate(
            EvalConfig(dataset=str(demo), out=tmp_path, model="m", backend="openai", base_url=server.url)
        )
    keys = [r["key"] for r in checked_predictions(tmp_path)]
    assert len(keys) == len(set(keys)) == 3 * ROWS and kept <= set(keys)
    assert result["asked"] == 3 * ROWS - len(kept) == server.count - before


def test_compare(demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with FakeOpenAI(Scripted(demo)) as server:
        for mode in ("direct", "attrseek"):
            evaluate(
                EvalConfig(
                    dataset=str(demo),
                    out=tmp_path / mode,
                    model="m",
                    backend="openai",
                    base_url=server.url,
                    mode=mode,
                )
            )
    table = tmp_path / "compare.md"
    code, stdout, _ = run_cli(
        ["compare", str(tmp_path / "direct"), str(tmp_path / "attrseek"), "--out", str(table)], capsys
    )
    assert code == 0 and stdout == table.read_text()
    lines = stdout.splitlines()
    assert lines[0] == f"| level | metric | {tmp_path / 'direct'} | {tmp_path / 'attrseek'} | Δ |"
    assert "| fine | modified EM | 0.125 | 0.125 | +0.000 |" in lines
    assert "| coarse | count | 16 | 16 | – |" in lines
    code, _, err = run_cli(["compare", str(tmp_path)], capsys)
    assert code == 2 and "no readable metrics.json" in err


def test_metrics_file_round_trips_and_older_and_newer_files_compare_alike(demo: Path, tmp_path: Path) -> None:
    """metrics.json holds what the run returned, each part as `finer.records` declares it; a file of an
    older finer (without the empty, stored_truncated and skipped counts) and one with more keys (--batch's
    `batch`, a newer finer's) load with every key kept and compare as the same scores."""
    folder = tmp_path / "eval"
    with FakeOpenAI(Scripted(demo)) as server:
        config = EvalConfig(dataset=str(demo), out=folder, model="m", backend="openai", base_url=server.url)
        result = evaluate(dataclasses.replace(config, limit=4))
    metrics = read_metrics_file(folder)
    assert metrics == {key: result[key] for key in ("rules", "predictions", "runs", "usage")}
    declared(metrics, MetricsRecord)
    declared(metrics["usage"], UsageCounts)
    for run in metrics["runs"]:
        declared(run, RunMetrics)
        for level in run["levels"].values():
            declared(level, LevelMetrics)
            assert level["per_class"]
            for scores in level["per_class"].values():
                declared(scores, ClassMetrics)
    table = compare([folder])
    older = json.loads(json.dumps(metrics))
    for level in older["runs"][0]["levels"].values():
        for count in ("empty", "stored_truncated", "skipped"):
            del level[count]
    newer = {**metrics, "batch": {"batches": ["batch_1"]}, "from_a_newer_finer": 1}
    for name, written in (("older", older), ("newer", newer)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(written))
        assert read_metrics_file(tmp_path / name) == written
        assert compare([tmp_path / name]) == table.replace(str(folder), str(tmp_path / name))


WRITTEN_METRICS = {
    "rules": "ours",
    "predictions": 1,
    "runs": [
        {
            "label": "direct",
            "run": {"model": "m", "mode": "direct"},
            "levels": {
                "fine": {"count": 1, "em": 1.0, "strict_em": 1.0, "f1": 1.0, "truncated": 0, "per_class": {}}
            },
        }
    ],
}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"rules": "ours", "runs": [', "not valid JSON (Expecting value: line 1 column 28"),
        (json.dumps({"rules": "ours", "predictions": 1}), "lacks `runs`"),
        (json.dumps({**WRITTEN_METRICS, "runs": [{"label": "x", "run": {}}]}), "lacks `runs[0].levels`"),
        (json.dumps({**WRITTEN_METRICS, "runs": {}}), "`runs` is not a list"),
    ],
)
def test_compare_names_a_damaged_metrics_file_and_the_fix(
    text: str, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "metrics.json").write_text(json.dumps(WRITTEN_METRICS))
    code, stdout, _ = run_cli(["compare", str(tmp_path)], capsys)
    assert code == 0 and "| fine | modified EM | 1.000 |" in stdout
    (tmp_path / "metrics.json").write_text(text)
    code, _, err = run_cli(["compare", str(tmp_path)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: {tmp_path / 'metrics.json'}: {problem}")
    assert lines[0].endswith(
        f"; run the same `finer eval --out {tmp_path}` again to recompute it from predictions.jsonl"
    )


# --- bad input ----------------------------------------------------------------------------------------


def test_bad_input_is_one_line_exit_2(demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    llava = str(tiny_vlm_path("llava"))
    no_fine = tmp_path / "no-fine"
    datasets.load_from_disk(str(demo)).remove_columns("fine").save_to_disk(str(no_fine))
    capsys.readouterr()  # the save's progress bar
    cases = [
        (["--dataset", str(demo), "--split", "validation"], "has no split 'validation'; available: test"),
        (["--dataset", str(no_fine)], "lacks column(s) fine"),
        (["--dataset", str(tmp_path / "missing")], "no such folder"),
        (["--dataset", str(demo), "--backend", "openai", "--adapter", "x"], "--adapter needs --backend hf"),
        (["--dataset", str(demo), "--backend", "openai"], "needs an endpoint"),
        (["--dataset", str(demo), "--mode", "choice", "--level", "superordinate"], "nothing to choose from"),
    ]
    for args, message in cases:
        code, _, err = run_cli(["eval", "--model", llava, "--out", str(tmp_path / "o"), *args], capsys)
        assert code == 2 and len(err.splitlines()) == 1 and message in err, (args, err)
    assert not (tmp_path / "o").exists()

    with FakeOpenAI(lambda request: "Answer: Bird", images=False) as server:
        argv = [
            "eval",
            "--dataset",
            str(demo),
            "--backend",
            "openai",
            "--model",
            "text-only",
            "--base-url",
            server.url,
        ]
        code, _, err = run_cli([*argv, "--out", str(tmp_path / "o")], capsys)
        assert code == 2 and len(err.splitlines()) == 1
        assert "refused an image for model 'text-only'" in err and "--mode probe" in err


class Sizes:
    """A backend that answers nothing useful and records the size of every image it is shown."""

    def __init__(self) -> None:
        self.sizes: list[tuple[int, int]] = []

    def run(self, tasks: Any, sink: Any) -> None:
        for task in tasks:
            self.sizes.append(task.image().size)
            sink.done(task, [Generation("Answer: nothing", False)])


def test_crop_to_bbox_shows_the_box_and_keys_apart(demo: Path, tmp_path: Path) -> None:
    rows = datasets.load_from_disk(str(demo))["test"].select(range(3))
    boxes = [(round(x + w) - round(x), round(y + h) - round(y)) for x, y, w, h in rows["bbox"]]
    whole, cropped = Sizes(), Sizes()
    base = {"dataset": str(demo), "out": tmp_path, "model": "m", "limit": 3, "level": "fine"}
    evaluate(EvalConfig(**base), backend=whole)
    evaluate(EvalConfig(**base, crop_to_bbox=True), backend=cropped)  # same folder: new keys, asked again
    assert cropped.sizes == boxes and whole.sizes == [im.size for im in rows["image"]] != boxes
    assert len(checked_predictions(tmp_path)) == 6


def test_openai_answers_cut_at_the_token_limit_are_flagged(demo: Path, tmp_path: Path) -> None:
    def verbose(request: dict[str, Any]) -> str:
        return "Let me think about the plumage first. Answer: Bird"  # nine words

    with FakeOpenAI(verbose) as server:
        config = EvalConfig(
            dataset=str(demo), out=tmp_path, model="m", backend="openai", base_url=server.url, limit=2
        )
        evaluate(config, backend=OpenAIBackend("m", server.url, max_new_tokens=5))
        assert {r["json"]["max_tokens"] for r in server.requests} == {5}
        assert all(r["truncated"] and r["prediction"].count(" ") == 4 for r in checked_predictions(tmp_path))
        long_enough = tmp_path / "long"
        evaluate(EvalConfig(**{**config.__dict__, "out": long_enough}))  # the default limit, 128
    assert not any(r["truncated"] for r in checked_predictions(long_enough))


def test_openai_max_tokens_becomes_max_completion_tokens_where_refused(demo: Path, tmp_path: Path) -> None:
    def reasoning_model(request: dict[str, Any]) -> Any:
        if "max_tokens" in request:
            message = "Unsupported parameter: 'max_tokens' is not supported with this model."
            return Fault(status=400, message=f"{message} Use 'max_completion_tokens' instead.")
        return "Let me think about the plumage first. Answer: Bird"

    with FakeOpenAI(reasoning_model) as server:
        config = EvalConfig(dataset=str(demo), out=tmp_path, model="m", base_url=server.url, limit=2)
        result = evaluate(EvalConfig(**{**config.__dict__, "backend": "openai", "max_new_tokens": 5}))
        sent = [r["json"] for r in server.requests]
    asked = [r for r in sent if "max_tokens" not in r]  # those in flight before the first refusal: again
    assert result["failed"] == 0 and "max_tokens" in sent[0] and len(asked) == result["answered"] == 6
    assert all(r.get("max_completion_tokens") == 5 for r in asked)
    assert all(r["truncated"] for r in checked_predictions(tmp_path))

    def context_full(request: dict[str, Any]) -> Any:  # names max_tokens, refuses nothing
        return Fault(status=400, message="'max_tokens' is too large: 5. This model's maximum context is 4")

    with FakeOpenAI(context_full) as server:
        config = EvalConfig(dataset=str(demo), out=tmp_path / "full", model="m", backend="openai", limit=1)
        config.base_url, config.level, config.max_new_tokens = server.url, "fine", 5
        with pytest.raises(FinerError, match="every request failed"):
            evaluate(config)
        assert all("max_tokens" in r["json"] for r in server.requests)


def test_a_second_eval_into_the_same_folder_is_refused_before_any_call(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    with FakeOpenAI(Scripted(demo)) as server, OutputLock(out):
        argv = ["eval", "--dataset", str(demo), "--backend", "openai", "--model", "vlm-1"]
        code, _, err = run_cli([*argv, "--base-url", server.url, "--out", str(out)], capsys)
        assert server.count == 0
    assert code == 2 and f"pid {os.getpid()}" in err and "being written by another run" in err
