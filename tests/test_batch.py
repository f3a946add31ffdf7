"""`--batch` (issue 18): calls through the OpenAI Batch API of the fake server (files, batches, output and
error files), answers stored in the cache as synchronous replies are, failed and expired items retried
synchronously or in a new batch, and a run killed while its batch is pending re-attaching to it."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
from test_grounding import built, cub, grounder  # noqa: F401 - fixtures used by name
from test_scale import ASKED, OVER_BUDGET_EXIT, config, run_main

from finer.data.grounding import ground
from finer.models.batch import batch_record_path, run_batched
from finer.models.policy import RunPolicy, use_policy
from finer.testing.fake_batches import FakeBatches
from finer.testing.fake_openai import FakeOpenAI


def fates(*first: str):
    """The first items' fates in the order the batches list them, then "ok"."""
    order = itertools.count()
    return lambda custom_id, body: first[n] if (n := next(order)) < len(first) else "ok"


def batched_ground(config, *, retry: str) -> tuple[dict, object]:
    policy = RunPolicy()
    with use_policy(policy):
        step = lambda where: ground(dataclasses.replace(config, out=where))  # noqa: E731
        report = run_batched(step, config.out, policy, retry=retry, poll_s=0.05)
        summary = ground(config)
    return summary, report


def all_grounded(out: Path) -> None:
    grounded = datasets.load_from_disk(str(out))
    statuses = [row["grounding_status"] for split in grounded.values() for row in split.to_list()]
    assert set(statuses) == {"ok", "unreadable"} and statuses.count("unreadable") == 1


def test_batch_answers_then_failed_and_expired_items_go_synchronously(built: Path, tmp_path: Path) -> None:  # noqa: F811
    batches = FakeBatches(delay=0.2, fate=fates("failed", "expired"))
    with FakeOpenAI(grounder, batches=batches) as server:
        summary, report = batched_ground(config(built, tmp_path / "g", server), retry="sync")
        assert server.count == 2, "only the failed and the expired item are asked synchronously"
    assert batches.created == ["batch_0"]
    counts = report.to_json()
    assert (counts["requests"], counts["completed"], counts["failed"], counts["expired"]) == (
        ASKED,
        ASKED - 2,
        1,
        1,
    )
    assert counts["retried_sync"] == 2 and counts["prompt_tokens"] > 0
    assert summary["calls"] == 2 and summary["cache_hits"] == ASKED - 2
    all_grounded(tmp_path / "g")
    assert not batch_record_path(tmp_path / "g").read_text().strip("{}\n ")  # nothing left pending


def test_batch_retry_batch_sends_the_failed_ones_in_a_new_batch(built: Path, tmp_path: Path) -> None:  # noqa: F811
    batches = FakeBatches(fate=fates("failed", "expired"))
    with FakeOpenAI(grounder, batches=batches) as server:
        summary, report = batched_ground(config(built, tmp_path / "g", server), retry="batch")
        assert server.count == 0
    assert batches.created == ["batch_0", "batch_1"]
    assert report.to_json()["completed"] == ASKED and summary["cache_hits"] == ASKED
    all_grounded(tmp_path / "g")


SCRIPT = """
import dataclasses, sys
from pathlib import Path
from finer.data.grounding import GroundConfig, ground
from finer.models.batch import run_batched
from finer.models.policy import RunPolicy, use_policy
config = GroundConfig(dataset=sys.argv[1], out=Path(sys.argv[2]), model=sys.argv[5], base_url=sys.argv[3],
                      cache=Path(sys.argv[4]), progress=False)
policy = RunPolicy()
with use_policy(policy):
    run_batched(lambda where: ground(dataclasses.replace(config, out=where)), config.out, policy, poll_s=0.05)
    ground(config)
"""


def kill_once_pending(argv: list[str], out: Path) -> None:
    """Run `argv` and SIGKILL it as soon as it has recorded a pending batch for `out`."""
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record = batch_record_path(out)
    deadline = time.monotonic() + 60
    while not (record.is_file() and json.loads(record.read_text())) and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()


def test_a_run_killed_while_its_batch_is_pending_reattaches(built: Path, tmp_path: Path) -> None:  # noqa: F811
    batches = FakeBatches(delay=3.0)
    out = tmp_path / "g"
    with FakeOpenAI(grounder, batches=batches) as server:
        cfg = config(built, out, server)
        kill_once_pending(
            [sys.executable, "-c", SCRIPT, str(built), str(out), server.url, str(cfg.cache), cfg.model], out
        )
        assert batches.created == ["batch_0"] and not out.exists()
        summary, report = batched_ground(cfg, retry="sync")
        assert server.count == 0
    assert batches.created == ["batch_0"], "the re-run submitted the batch again"
    assert report.to_json()["completed"] == ASKED and summary["cache_hits"] == ASKED
    all_grounded(out)


def test_ground_batch_from_the_cli(built: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    batches = FakeBatches(fate=fates("expired"))
    out = tmp_path / "g"
    with FakeOpenAI(grounder, batches=batches) as server:
        argv = ["ground", str(built), "--out", str(out), "--model", "gpt-4o", "--base-url", server.url]
        assert run_main([*argv, "--cache", str(tmp_path / "c"), "--batch"]) == 0
        assert server.count == 1  # the expired one, synchronously
    report = json.loads((out / "grounding.json").read_text())["batch"]
    assert report["completed"] == ASKED - 1 and report["expired"] == 1 and report["retried_sync"] == 1
    assert isinstance(report["cost_usd_at_batch_price"], float) and batches.created == ["batch_0"]
    assert f"batch: {ASKED - 1} of {ASKED} calls answered" in capsys.readouterr().out
    all_grounded(out)


def test_max_cost_holds_a_batch_to_the_budget_and_a_rerun_batches_the_rest(
    built: Path,  # noqa: F811
    tmp_path: Path,
    capsys,
) -> None:
    """`--batch --max-cost`: only the calls the budget holds (at batch price) are submitted, nothing is
    asked synchronously, the run exits 3; a re-run with a larger budget batches exactly the rest."""
    batches = FakeBatches()
    out, cache = tmp_path / "g", tmp_path / "c"
    with FakeOpenAI(grounder, batches=batches) as server:
        argv = ["ground", str(built), "--out", str(out), "--model", "gpt-4o", "--base-url", server.url]
        argv += ["--cache", str(cache)]
        assert run_main([*argv, "--dry-run"]) == 0
        projected = float(re.search(r"total: .* tokens, ([0-9.]+) USD", capsys.readouterr().out).group(1))
        budget = 0.5 * projected * 0.5  # half of the run at batch price (half the list price)
        assert run_main([*argv, "--batch", "--max-cost", f"{budget:.8f}"]) == OVER_BUDGET_EXIT
        assert "stopped at --max-cost" in capsys.readouterr().err
        assert server.count == 0, "a call refused by the budget went synchronously"
        first = json.loads((out / "grounding.json").read_text())["batch"]
        assert 0 < first["requests"] < ASKED and first["cost_usd_at_batch_price"] <= budget
        assert run_main([*argv, "--batch", "--overwrite"]) == 0
        assert server.count == 0
    second = json.loads((out / "grounding.json").read_text())["batch"]
    assert second["requests"] == ASKED - first["requests"], "a call was batched twice or left out"
    assert batches.created == ["batch_0", "batch_1"]
