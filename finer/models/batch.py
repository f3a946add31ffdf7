"""`--batch`: the run's calls through the OpenAI Batch API (half price, answered within 24 h).

A step cannot wait a day inside one call, so a batch run is done in passes of the ordinary run
(`run_batched`): a collecting pass runs the step with every cache miss recorded instead of sent (the
`Collector`, like `--dry-run`); the misses go in one batch per endpoint and model, as JSONL whose `custom_id`
is the call's cache key; the batch is uploaded through the files API, created with the 24 h window, and
polled with a progress bar; every answer is stored in the cache exactly as a synchronous reply would be.
Passes repeat while new calls appear (a step whose prompts depend on earlier replies: repair turns, eval's
multi-turn modes), then the ordinary run reads every reply from the cache: the same parsing, validation,
repair turns and resume as ever. A pass starts from a copy of what the run resumes from in its own folder
(eval's predictions.jsonl), so it collects only the calls the run itself would still make.
Items that failed or expired are retried synchronously by that last run (`--batch-retry sync`) or in a
new batch first (`--batch-retry batch`), and counted.

The batch id is written beside `--out` (`.<name>.batch.json`) before polling starts, so a run killed while
a batch is pending (SIGKILL included) re-attaches to it on the next run instead of paying for it twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import openai
from tqdm.auto import tqdm

from finer.cache import Cache, cache_key
from finer.errors import FinerError
from finer.models.client import NO_KEY
from finer.records import BUILD_FILE, GROUNDING_FILE, METRICS_FILE
from finer.run_folder import carry_progress, write_json

__all__ = [
    "BatchReport",
    "Collector",
    "batch_record_path",
    "run_batched",
    "run_config_batched",
    "submit_and_wait",
]

CACHE_NAMESPACE = "llm"
COMPLETION_WINDOW = "24h"
ENDPOINT = "/v1/chat/completions"
#: Collecting passes at most: each one batches what the previous answers made possible (or retried). Eval's
#: `finer` replay has three turns, each built from the replies before it; each turn retried once in a
#: batch (`--batch-retry batch`) makes six.
MAX_PASSES = 6
POLL_S = 10.0
DONE = ("completed", "failed", "expired", "cancelled")


@dataclass
class _Group:
    """The calls of one endpoint and model: one batch."""

    base_url: str
    api_key: str
    model: str
    cache: Cache
    requests: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Each call's projected cost at batch price (its counted input, `max_tokens` or this run's mean output).
    costs: dict[str, float] = field(default_factory=dict)


class Collector:
    """Calls a collecting pass would have made, by cache key, grouped by endpoint and model."""

    def __init__(self) -> None:
        self.groups: dict[tuple[str, str], _Group] = {}
        self._lock = threading.Lock()

    def add(
        self, base_url: str, api_key: str, model: str, cache: Cache, key: str, request: dict, cost: float
    ) -> None:
        with self._lock:
            group = self.groups.setdefault((base_url, model), _Group(base_url, api_key, model, cache))
            group.requests[key] = request
            group.costs[key] = cost

    def keys(self) -> set[str]:
        return {key for group in self.groups.values() for key in group.requests}


@dataclass
class BatchReport:
    """What the batches of a run did, for its summary (build.json, grounding.json or metrics.json, under
    "batch")."""

    batches: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0
    completed: int = 0
    failed: int = 0
    expired: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = 0.0
    #: Calls left to the synchronous run after failing or expiring in a batch.
    retried_sync: int = 0

    def to_json(self) -> dict[str, Any]:
        values = asdict(self)
        cost = values.pop("cost_usd")
        return {**values, "cost_usd_at_batch_price": "unknown" if cost is None else round(cost, 6)}


def batch_record_path(out: Path) -> Path:
    """Where a run records its pending batches: beside `--out`, which only appears when the run ends."""
    return out.parent / f".{out.name}.batch.json"


def submit_and_wait(
    collector: Collector,
    record: Path,
    report: BatchReport,
    *,
    price: Callable[[str, int, int], float | None],
    poll_s: float = POLL_S,
) -> set[str]:
    """Send each group's calls as one batch (or re-attach to the one recorded for the same calls), wait for
    it, store every answer in the cache; returns the keys that failed or expired."""
    failed: set[str] = set()
    for group in collector.groups.values():
        failed |= _one_batch(group, record, report, price, poll_s)
    return failed


def _one_batch(
    group: _Group, record: Path, report: BatchReport, price: Callable[..., float | None], poll_s: float
) -> set[str]:
    client = openai.OpenAI(api_key=group.api_key or NO_KEY, base_url=group.base_url or None)
    calls = cache_key(group.base_url, group.model, sorted(group.requests))
    recorded = _read(record)
    batch_id = recorded.get(calls)
    if batch_id is None:
        lines = "".join(
            json.dumps({"custom_id": key, "method": "POST", "url": ENDPOINT, "body": body}) + "\n"
            for key, body in group.requests.items()
        )
        upload = client.files.create(file=("finer-batch.jsonl", lines.encode()), purpose="batch")
        batch = client.batches.create(
            input_file_id=upload.id, endpoint=ENDPOINT, completion_window=COMPLETION_WINDOW
        )
        batch_id = batch.id
        write_json(record, {**recorded, calls: batch_id})  # before polling: a killed run re-attaches
    else:
        tqdm.write(f"re-attaching to batch {batch_id} ({len(group.requests)} calls)")
    batch = _wait(client, batch_id, len(group.requests), poll_s)
    failed = _store(client, batch, group, report, price)
    report.batches.append({"id": batch_id, "model": group.model, "status": batch.status})
    write_json(record, {k: v for k, v in _read(record).items() if k != calls})
    return failed


def _wait(client: openai.OpenAI, batch_id: str, total: int, poll_s: float) -> Any:
    """Poll until the batch ends, showing completed and failed counts."""
    with tqdm(total=total, desc=f"batch {batch_id}", unit=" call", dynamic_ncols=True) as bar:
        while True:
            batch = client.batches.retrieve(batch_id)
            counts = batch.request_counts
            if counts is not None:
                bar.n = counts.completed + counts.failed
                bar.set_postfix(status=batch.status, failed=counts.failed, refresh=True)
            if batch.status in DONE:
                return batch
            time.sleep(poll_s)


def _store(client: openai.OpenAI, batch: Any, group: _Group, report: BatchReport, price: Callable) -> set:
    """Cache every answered call as a synchronous reply is cached; the rest are failed or expired."""
    answered: set[str] = set()
    if batch.output_file_id:
        for line in client.files.content(batch.output_file_id).text.splitlines():
            entry = json.loads(line) if line.strip() else {}
            response = entry.get("response") or {}
            key = entry.get("custom_id")
            if key not in group.requests or response.get("status_code") != 200:
                continue
            body = response.get("body") or {}
            choice = (body.get("choices") or [{}])[0]
            usage = body.get("usage") or {}
            prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
            group.cache.put(
                CACHE_NAMESPACE,
                key,
                {
                    "text": (choice.get("message") or {}).get("content") or "",
                    "finish_reason": str(choice.get("finish_reason") or "stop"),
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "batch": batch.id,
                },
            )
            answered.add(key)
            report.prompt_tokens += prompt
            report.completion_tokens += completion
            cost = price(group.model, prompt, completion)
            report.cost_usd = None if cost is None or report.cost_usd is None else report.cost_usd + cost
    expired = set()
    if batch.error_file_id:
        for line in client.files.content(batch.error_file_id).text.splitlines():
            entry = json.loads(line) if line.strip() else {}
            if (entry.get("error") or {}).get("code") == "batch_expired":
                expired.add(entry.get("custom_id"))
    failed = set(group.requests) - answered
    report.requests += len(group.requests)
    report.completed += len(answered)
    report.expired += len(failed & expired)
    report.failed += len(failed - expired)
    return failed


def _read(record: Path) -> dict[str, str]:
    try:
        value = json.loads(record.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def run_batched(
    step: Callable[[Path], Any], out: Path, policy: Any, *, retry: str = "sync", poll_s: float = POLL_S
) -> BatchReport:
    """Answer through batches every call `step` (the run, writing into the folder it is given) would make,
    so that `step(out)` afterwards finds them in the cache. `retry` "sync" leaves failed and expired calls
    to that last run; "batch" sends them in the next batch first (one more try each)."""
    if retry not in ("sync", "batch"):
        raise FinerError("--batch-retry is sync or batch")
    report, given_up, tries = BatchReport(), set(), {}
    price = lambda model, prompt, completion: policy.prices.cost(model, prompt, completion, batch=True)  # noqa: E731
    for _ in range(MAX_PASSES):
        policy.collector = collector = Collector()
        try:
            # "every request failed" ends a collecting pass: each of them was collected
            with (
                tempfile.TemporaryDirectory(prefix="finer-batch-") as scratch,
                contextlib.suppress(FinerError),
            ):
                step(Path(scratch) / "out")
        finally:
            policy.collector = None
        for group in collector.groups.values():
            group.requests = {k: v for k, v in group.requests.items() if k not in given_up}
        held = _within_budget(collector, policy.budget)
        if not collector.keys():
            break
        spent = report.cost_usd or 0.0
        for key in submit_and_wait(collector, batch_record_path(out), report, price=price, poll_s=poll_s):
            tries[key] = tries.get(key, 0) + 1
            if retry == "sync" or tries[key] > 1:
                given_up.add(key)
        if policy.budget is not None:
            policy.budget.settle(held, (report.cost_usd or 0.0) - spent)
    report.retried_sync = len(given_up)
    return report


def _within_budget(collector: Collector, budget: Any) -> float:
    """`--max-cost`: keep the calls whose projected cost the budget holds, in key order (the same calls on
    a re-run, so a killed run still re-attaches to its batch), and drop the rest; once one is refused no
    other starts, and the run's synchronous calls are refused too. Returns the cost held."""
    if budget is None:
        return 0.0
    held = 0.0
    for group in collector.groups.values():
        kept = {
            key: group.requests[key] for key in sorted(group.requests) if budget.reserve(group.costs[key])
        }
        held += sum(group.costs[key] for key in kept)
        group.requests = kept
    return held


#: The run summaries a batched run records its batches in (under "batch").
SUMMARY_FILES = (BUILD_FILE, GROUNDING_FILE, METRICS_FILE)


def run_config_batched(
    run: Callable[[Any], Any], config: Any, policy: Any, *, retry: str = "sync", poll_s: float = POLL_S
) -> tuple[Any, BatchReport]:
    """`run(config)` after every call it would make was answered through batches (`run_batched`); the
    batches' ids, counts and batch-price cost go into the run's summary (build.json, grounding.json or
    metrics.json)."""
    if policy.projection is not None:
        raise FinerError(
            "--batch and --dry-run: run the dry run alone (its USD at batch price: x (1 - discount))"
        )
    scratch = {"export_finer": None} if hasattr(config, "export_finer") else {}  # a pass writes nothing else

    def passes(where: Path) -> Any:
        carry_progress(config.out, where)
        return run(dataclasses.replace(config, out=where, **scratch))

    report = run_batched(passes, config.out, policy, retry=retry, poll_s=poll_s)
    result = run(config)
    for name in SUMMARY_FILES:
        if (summary := config.out / name).is_file():
            write_json(summary, {**json.loads(summary.read_text()), "batch": report.to_json()})
    return result, report
