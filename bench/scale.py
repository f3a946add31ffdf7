"""Cost and scale benchmarks of the shared client layer (issue 18), against fake OpenAI-compatible servers.

1. Several endpoints: `ground` over `--images` (1,000) distinct images against one endpoint and against two,
   each answering in 200 ms at the same per-endpoint `--concurrency` (goal: two grounds >= 1.8x the images
   per second). The servers run in processes of their own, as replicas would.
2. Rate limit: `ground` at `--rpm` against a server answering at once (in this process, for its request
   log): requests per minute over the run, and the most in any sliding 60-s window (goal: within 5 % of
   --rpm, never above).
3. Projection: `--dry-run` of `ground` over 200 images, then the real run against a server that bills
   text by gpt-4o's tokenizer and images by the tile rule: projected versus billed tokens and USD at
   gpt-4o prices.

    .venv/bin/python bench/scale.py [--images N] [--concurrency N ...] [--repeats N] [--parts 1 2 3]
        [--rpm R] [--rpm-images N]
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

from _common import fake_endpoint  # bench/_common.py: a script's own folder is on sys.path
from ground_throughput import ANSWER, LATENCY_S, write_dataset

from finer.data.grounding import GroundConfig, ground
from finer.errors import FinerError
from finer.models.policy import Projection, RunPolicy, use_policy
from finer.testing.fake_openai import FakeOpenAI, billed_tokens


def config(data: Path, out: Path, url: str, concurrency: int, **extra: object) -> GroundConfig:
    return GroundConfig(
        dataset=str(data),
        out=out,
        model=str(extra.pop("model", "fake-vlm")),
        base_url=url,
        concurrency=concurrency,
        cache=Path(str(extra.pop("cache", out.parent / f"cache-{out.name}"))),
        progress=False,
        **extra,  # type: ignore[arg-type]
    )


def timed(config: GroundConfig) -> tuple[float, dict]:
    started = time.perf_counter()
    summary = ground(config)
    elapsed = time.perf_counter() - started
    assert summary["images"]["failed"] == 0, summary["images"]
    return summary["images"]["grounded"] / elapsed, summary


def cpu_s() -> float:
    """CPU seconds this process (the client: every thread) used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def endpoints(data: Path, work: Path, images: int, concurrency: int, run: int = 0) -> float:
    """Images per second of `ground` against one endpoint and against two (the same servers), with the
    CPU each run cost the client and the servers, and the machine's load average before each."""
    with fake_endpoint(ANSWER, LATENCY_S) as a, fake_endpoint(ANSWER, LATENCY_S) as b:
        ground(config(data, work / f"warm-{concurrency}-{run}", a.url, 2, limit=2))
        rates, lines = [], []
        for name, urls in (("one endpoint: ", a.url), ("two endpoints:", f"{a.url},{b.url}")):
            load = os.getloadavg()[0]
            client, servers = cpu_s(), a.cpu_s() + b.cpu_s()
            out = work / f"{name.split()[0]}-{concurrency}-{run}"
            rate, summary = timed(config(data, out, urls, concurrency))
            client, servers = cpu_s() - client, a.cpu_s() + b.cpu_s() - servers
            rates.append(rate)
            per_endpoint = list(summary.get("calls_per_endpoint", {}).values()) or [summary["calls"]]
            lines.append(
                f"   {name} {rate:7.2f} img/s ({images / rate:6.1f} s); CPU per image: client "
                f"{1000 * client / images:.2f} ms, servers {1000 * servers / images:.2f} ms; "
                f"load {load:.2f}; calls per endpoint {per_endpoint}"
            )
    gain = rates[1] / rates[0]
    print(
        f"1. ground, {images} images, endpoints answering in {LATENCY_S * 1000:.0f} ms, "
        f"--concurrency {concurrency} (peak in flight at one endpoint: {a.peak}):"
    )
    print("\n".join(lines))
    print(f"   gain {gain:.2f}x (goal >= 1.8x) {'PASS' if gain >= 1.8 else 'FAIL'}", flush=True)
    return gain


def rate_limit(data: Path, work: Path, rpm: float, images: int) -> None:
    with FakeOpenAI(lambda request: {"black crown": "visible"}) as server:
        with use_policy(RunPolicy.from_options(rpm=rpm)):
            started = time.perf_counter()
            ground(config(data, work / "rpm", server.url, 32, limit=images))
            elapsed = time.perf_counter() - started
        times = sorted(entry["time"] for entry in server.requests)
    measured = (len(times) - 1) / (times[-1] - times[0]) * 60
    busiest = max(bisect.bisect_left(times, t + 60) - i for i, t in enumerate(times))
    within = abs(measured - rpm) <= 0.05 * rpm and busiest <= rpm
    print(f"2. ground, {len(times)} requests at --rpm {rpm:g}, 32 workers ({elapsed:.1f} s):")
    print(
        f"   measured {measured:.1f} requests/min ({100 * (measured / rpm - 1):+.2f} %); "
        f"busiest 60-s window {busiest}"
    )
    print(f"   {'PASS' if within else 'FAIL'} (goal: within 5 %, never above)")


def dry_run(data: Path, out: Path, url: str, images: int, cache: Path) -> dict:
    """The projection of grounding the first `images` images (nothing sent)."""
    policy = RunPolicy(projection=Projection())
    with use_policy(policy), contextlib.suppress(FinerError):  # "every request failed": all counted
        ground(config(data, out, url, 16, limit=images, model="gpt-4o", cache=cache))
    (step,) = policy.projection.to_json(policy.prices)["steps"].values()
    return step


def projection(data: Path, work: Path, images: int) -> None:
    """Dry run of `images`, the real run of half, a dry run of all (half cached), the real rest."""
    answer = {"black crown": "visible", "white wing bars": "not visible"}
    cache = work / "cache-projection"
    with FakeOpenAI(lambda request: answer, count_tokens=billed_tokens, bill_images=True) as server:
        cold = dry_run(data, work / "dry-cold", server.url, images, cache)
        _, half = timed(
            config(data, work / "half", server.url, 16, limit=images // 2, model="gpt-4o", cache=cache)
        )
        warm = dry_run(data, work / "dry-warm", server.url, images, cache)
        assert server.count == half["calls"]
        _, rest = timed(
            config(data, work / "rest", server.url, 16, limit=images, model="gpt-4o", cache=cache)
        )
    print("3. ground at gpt-4o prices (built-in table), text billed by its tokenizer, images by tiles:")
    for name, step, real in (("cold", cold, None), ("half", None, half), ("warm", warm, rest)):
        if step is not None:
            tokens_in = step["input_text_tokens"] + step["input_image_tokens"]
            print(
                f"   dry run ({name}): {step['calls']} calls + {step['cached_calls']} cached; "
                f"input {tokens_in} ({step['input_image_tokens']} image); output {step['output_tokens']} "
                f"({step['output_tokens_from']}); {step['usd']} USD"
            )
        if real is not None:
            print(
                f"   real run: {real['calls']} calls; input {real['prompt_tokens']}; output "
                f"{real['completion_tokens']}; {real['estimated_cost_usd']} USD"
            )
    tokens_in = warm["input_text_tokens"] + warm["input_image_tokens"]
    print(
        f"   warm projection vs the calls then made: "
        f"input {100 * (tokens_in / rest['prompt_tokens'] - 1):+.2f} %, "
        f"output {100 * (warm['output_tokens'] / rest['completion_tokens'] - 1):+.2f} %, "
        f"USD {100 * (warm['usd'] / rest['estimated_cost_usd'] - 1):+.2f} %"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument(
        "--concurrency", type=int, nargs="*", default=[8, 16], help="Per endpoint (none: skip 1)."
    )
    parser.add_argument("--rpm", type=float, default=600, help="Lasts over a minute with --rpm-images 1000.")
    parser.add_argument("--rpm-images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=1, help="Runs of part 1 per concurrency.")
    parser.add_argument("--parts", type=int, nargs="*", default=[1, 2, 3], choices=[1, 2, 3])
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="finer-bench-scale-") as tmp:
        work = Path(tmp)
        data = write_dataset(work / "data", args.images)
        if 1 in args.parts:
            for concurrency in args.concurrency:
                gains = [endpoints(data, work, args.images, concurrency, run) for run in range(args.repeats)]
                if len(gains) > 1:
                    print(f"   --concurrency {concurrency}: median gain {statistics.median(gains):.2f}x")
        if 2 in args.parts:
            rate_limit(data, work, args.rpm, args.rpm_images)
        if 3 in args.parts:
            projection(data, work, 200)


if __name__ == "__main__":
    main()
