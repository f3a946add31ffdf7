"""Throughput benchmark of `finer eval`'s two backends, on the embedded demo dataset.

- hf: the tiny LLaVA (`finer.testing`), greedy, `--max-new-tokens` tokens per answer, batch 8 vs batch 1.
  Goal: >= 3x the questions per second. Torch runs on one thread by default (`--threads`), so that the
  number measures batching, not how busy a shared CPU's other cores are.
- openai: the fake OpenAI-compatible server (its own process) answering every request after 200 ms,
  concurrency 32 vs 1: 60 questions one at a time, then every question about `--copies` copies of the demo
  split (960 by default) 32 at a time, so the fixed costs of a run do not hide the steady state.
  Goal: >= 20x the questions per second.

Each measurement is a whole `finer.eval.engine.evaluate` call into a fresh folder (prompts, images, the
predictions file, the report), with the model loaded and everything imported beforehand.

    .venv/bin/python bench/eval_throughput.py [--rows N] [--max-new-tokens N] [--threads N] [--copies N]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import datasets
import torch
from _common import fake_endpoint  # bench/_common.py: a script's own folder is on sys.path

from finer.data.build import BuildConfig, build
from finer.eval.engine import EvalConfig, evaluate
from finer.models.backends import HFBackend, OpenAIBackend
from finer.testing import build_tiny_vlm

LATENCY_S = 0.2
#: The fake endpoint's reply to every question (Python source: it runs in the endpoint's own process).
ANSWER = """
def answer(request):
    return "Answer: Bird"
"""


def timed(config: EvalConfig, backend: HFBackend | OpenAIBackend) -> float:
    """Questions answered per second by one evaluation run."""
    started = time.perf_counter()
    result = evaluate(config, backend=backend)
    elapsed = time.perf_counter() - started
    assert result["failed"] == 0 and result["answered"] == result["asked"] > 0
    return result["answered"] / elapsed


def bench_hf(data: Path, model: Path, work: Path, rows: int, max_new_tokens: int) -> dict[int, float]:
    rates = {}
    for attempt, batch_size in enumerate(
        (1, 8, 1, 8)
    ):  # twice each, the better counts: a shared CPU is noisy
        config = EvalConfig(
            dataset=str(data),
            out=work / f"hf-{attempt}",
            model=str(model),
            level="fine",
            limit=rows,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
        )
        backend = HFBackend(str(model), batch_size=batch_size, max_new_tokens=max_new_tokens)
        rates[batch_size] = max(rates.get(batch_size, 0.0), timed(config, backend))
    return rates


def replicate(data: Path, times: int, out: Path) -> Path:
    """The demo's test split ``times`` over, each copy with its own image ids: a split big enough for the
    concurrent run to reach its steady state, without rendering more demo images."""
    test = datasets.load_from_disk(str(data))["test"]
    copies = [
        test.map(lambda row, copy=copy: {"image_id": f"{row['image_id']}#{copy}"}, desc=None)
        for copy in range(times)
    ]
    datasets.DatasetDict({"test": datasets.concatenate_datasets(copies)}).save_to_disk(str(out))
    shutil.copy(data / "concepts.jsonl", out / "concepts.jsonl")
    return out


def bench_openai(data: Path, work: Path, copies: int) -> dict[int, float]:
    big = replicate(data, copies, work / "demo-big")
    rates = {}
    with fake_endpoint(ANSWER, LATENCY_S) as endpoint:
        # 60 questions one at a time (12 s of waiting); every image of the big split, 32 at a time
        for concurrency, dataset, limit in ((1, data, 20), (32, big, None)):
            config = EvalConfig(
                dataset=str(dataset),
                out=work / f"openai-{concurrency}",
                model="fake-vlm",
                backend="openai",
                base_url=endpoint.url,
                concurrency=concurrency,
                limit=limit,
            )
            backend = OpenAIBackend("fake-vlm", endpoint.url, concurrency=concurrency)
            rates[concurrency] = timed(config, backend)
    assert endpoint.peak is not None and endpoint.peak <= 32, endpoint.peak
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=48, help="Demo images for the hf runs (one level).")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="Torch intra-op threads.")
    parser.add_argument("--copies", type=int, default=5, help="Copies of the demo split (openai at 32).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="finer-bench-eval-") as tmp:
        work = Path(tmp)
        data = work / "demo"
        build(BuildConfig(source="demo", out=data, splits=["test"]))
        model = build_tiny_vlm("llava", work / "tiny-llava")
        # warm-up: imports, the first report and chart, the first generation
        evaluate(
            EvalConfig(dataset=str(data), out=work / "warm", model=str(model), limit=1, max_new_tokens=2)
        )

        hf = bench_hf(data, model, work, args.rows, args.max_new_tokens)
        api = bench_openai(data, work, args.copies)
    hf_gain, api_gain = hf[8] / hf[1], api[32] / api[1]
    print(
        f"hf tiny-llava, {args.rows} questions, {args.max_new_tokens} new tokens, {args.threads} thread(s):"
    )
    print(f"  batch 1: {hf[1]:7.2f} q/s   batch 8: {hf[8]:7.2f} q/s   gain {hf_gain:5.1f}x (goal >= 3x)")
    print(f"openai fake server, {LATENCY_S * 1000:.0f} ms per answer:")
    print(f"  concurrency 1: {api[1]:7.2f} q/s   concurrency 32: {api[32]:7.2f} q/s", end="")
    print(f"   gain {api_gain:5.1f}x (goal >= 20x)")
    print("PASS" if hf_gain >= 3 and api_gain >= 20 else "FAIL")


if __name__ == "__main__":
    main()
