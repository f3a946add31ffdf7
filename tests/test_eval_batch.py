"""`finer eval --backend openai --batch` (issue 18): the questions go through the fake server's Batch API,
the answers reach the run through its reply cache, and the predictions and metrics are the synchronous
run's; the `finer` replay's later turns (built from earlier replies) go in later batches; failed and expired
items are retried; a run killed while its batch is pending re-attaches; a local model is refused."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from test_batch import fates, kill_once_pending
from test_evaluate import EXPECTED, ROWS, Scripted, demo  # noqa: F401 - fixtures used by name

from finer.eval.engine import BATCH_CACHE, EvalConfig, evaluate
from finer.models.batch import run_config_batched
from finer.models.policy import RunPolicy, use_policy
from finer.records import read_metrics_file
from finer.testing.fake_batches import FakeBatches
from finer.testing.fake_openai import FakeOpenAI
from tests.cli_helpers import eval_argv, run_cli
from tests.records_check import checked_predictions

MODEL = "gpt-4o-mini"  # priced, so the batch price is a number


def ems(out: Path) -> dict[str, float]:
    (run,) = read_metrics_file(out)["runs"]
    return {level: values["em"] for level, values in run["levels"].items()}


def test_eval_batch_makes_no_call_and_matches_the_synchronous_run(
    demo: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The batch asks only what the folder still lacks (12 answers kept from a synchronous --limit 4 run)."""
    batches = FakeBatches()
    with FakeOpenAI(Scripted(demo), batches=batches) as server:
        assert run_cli(eval_argv(demo, tmp_path / "sync", server.url), capsys)[0] == 0
        assert run_cli(eval_argv(demo, tmp_path / "batch", server.url, "--limit", "4"), capsys)[0] == 0
        before = server.count
        code, stdout, _ = run_cli(eval_argv(demo, tmp_path / "batch", server.url, "--batch"), capsys)
        assert code == 0 and server.count == before, "a synchronous chat call was made"
    rest = 3 * ROWS - 3 * 4
    assert f"batch: {rest} of {rest} calls answered" in stdout and batches.created == ["batch_0"]
    synchronous, batched = read_metrics_file(tmp_path / "sync"), read_metrics_file(tmp_path / "batch")
    report = batched.pop("batch")
    assert report["requests"] == report["completed"] == rest
    # the final run reads every batch answer from its reply cache: no call of its own
    assert batched.pop("usage")["calls"] == 0 and synchronous.pop("usage")["calls"] == 3 * ROWS
    assert isinstance(report["cost_usd_at_batch_price"], float) and report["cost_usd_at_batch_price"] > 0
    assert batched == synchronous
    by_key = lambda out: {r["key"]: r for r in checked_predictions(out)}  # noqa: E731
    assert by_key(tmp_path / "batch") == by_key(tmp_path / "sync") and ems(tmp_path / "batch") == EXPECTED


def test_eval_batch_failed_and_expired_questions_are_asked_synchronously(
    demo: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    batches = FakeBatches(fate=fates("failed", "expired"))
    with FakeOpenAI(Scripted(demo), batches=batches) as server:
        argv = eval_argv(demo, tmp_path, server.url, "--batch", "--batch-retry", "sync")
        code, _, _ = run_cli(argv, capsys)
        assert code == 0 and server.count == 2, "only the failed and the expired question go synchronously"
    report = read_metrics_file(tmp_path)["batch"]
    assert (report["completed"], report["failed"], report["expired"], report["retried_sync"]) == (
        3 * ROWS - 2,
        1,
        1,
        2,
    )
    assert ems(tmp_path) == EXPECTED and len(checked_predictions(tmp_path)) == 3 * ROWS


def first_try_fails(scripted: Scripted, image_id: str) -> Callable[[str, dict], str]:
    """A batch fate: every call about `image_id` fails the first time it is sent."""
    seen: set[str] = set()

    def fate(custom_id: str, body: dict) -> str:
        url = next(b["image_url"]["url"] for b in body["messages"][0]["content"] if b["type"] == "image_url")
        if scripted.rows[url]["image_id"] != image_id or custom_id in seen:
            return "ok"
        seen.add(custom_id)
        return "failed"

    return fate


def test_eval_finer_replay_turn_by_turn_in_batches_each_failure_retried_in_a_batch(
    demo: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Three dependent turns, each of one image's failing once: six batches, no synchronous call."""
    scripted = Scripted(demo)
    unlucky = next(iter(scripted.rows.values()))["image_id"]
    batches = FakeBatches(fate=first_try_fails(scripted, unlucky))
    with FakeOpenAI(scripted, batches=batches) as server:
        argv = eval_argv(demo, tmp_path, server.url, "--mode", "finer", "--batch", "--batch-retry", "batch")
        code, _, _ = run_cli(argv, capsys)
        assert code == 0 and server.count == 0, "a turn was left to a synchronous call"
    assert len(batches.created) == 6
    report = read_metrics_file(tmp_path)["batch"]
    # one first turn per image (shared by its two levels), then the fine level's two later turns
    assert report["completed"] == 3 * ROWS and report["failed"] == 3 and report["retried_sync"] == 0
    assert ems(tmp_path) == {"coarse": 0.5, "fine": 0.125}
    fine = [r for r in checked_predictions(tmp_path) if r["level"] == "fine"]
    assert len(fine) == ROWS and all(len(r["turns"]) == 2 for r in fine)


def test_eval_killed_while_its_batch_is_pending_reattaches(demo: Path, tmp_path: Path) -> None:  # noqa: F811
    batches = FakeBatches(delay=3.0)
    out = tmp_path / "e"
    with FakeOpenAI(Scripted(demo), batches=batches) as server:
        kill_once_pending([sys.executable, "-m", "finer", *eval_argv(demo, out, server.url, "--batch")], out)
        assert batches.created == ["batch_0"] and not (out / "predictions.jsonl").exists()
        config = EvalConfig(
            dataset=str(demo),
            out=out,
            model=MODEL,
            backend="openai",
            base_url=server.url,
            cache=out / BATCH_CACHE,
        )
        policy = RunPolicy()
        with use_policy(policy):
            _, report = run_config_batched(evaluate, config, policy, poll_s=0.05)
        assert server.count == 0
    assert batches.created == ["batch_0"], "the re-run submitted the batch again"
    assert report.completed == 3 * ROWS and ems(out) == EXPECTED


def test_eval_batch_replies_are_reused_only_by_the_run_that_asked(
    demo: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Sampling (--temperature above 0) with another --seed asks again rather than replaying the cache."""
    batches = FakeBatches()
    with FakeOpenAI(Scripted(demo), batches=batches) as server:
        for seed in ("1", "2"):
            extra = ("--temperature", "0.5", "--seed", seed, "--cache", str(tmp_path / "c"), "--batch")
            assert run_cli(eval_argv(demo, tmp_path / "e", server.url, *extra), capsys)[0] == 0
        assert server.count == 0
    assert batches.created == ["batch_0", "batch_1"]
    assert read_metrics_file(tmp_path / "e")["batch"]["completed"] == 48
    assert len(list((tmp_path / "c").glob("eval-*"))) == 2 and not (tmp_path / "e" / BATCH_CACHE).exists()
    assert len(checked_predictions(tmp_path / "e")) == 2 * 3 * ROWS


def test_eval_batch_refuses_a_local_model(
    demo: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["eval", "--dataset", str(demo), "--out", str(tmp_path / "e"), "--model", "some/local-vlm"]
    code, _, err = run_cli([*argv, "--batch"], capsys)
    assert code == 2 and not (tmp_path / "e").exists()
    assert (
        err.strip()
        == "error: --batch sends endpoint calls to the OpenAI Batch API; it needs --backend openai"
    )
