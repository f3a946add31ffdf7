"""Attribute extraction throughput: 200 concepts against a fake LLM server answering in 200 ms.

Runs `finer.data.attributes.extract_attributes` (the build's LLM path) at concurrency 1 and 16, each with a
fresh cache, then once more on the warm cache. Goals (issue 4): concurrency 16 takes at most a tenth of
the sequential wall time; the re-run takes under 2 s with zero calls.

    .venv/bin/python bench/knowledge_throughput.py [--concepts 200] [--delay 0.2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

from finer.cache import Cache
from finer.data.attributes import extract_attributes
from finer.schema import Concept, Knowledge
from finer.testing.fake_openai import FakeOpenAI


def concepts(n: int) -> list[Concept]:
    return [
        Concept(
            concept_id=f"c{i:04d}",
            fine=[f"Warbler {i}"],
            superordinate="Bird",
            knowledge=Knowledge(text=f"Warbler {i} has a black crown and white wing bars.", status="found"),
        )
        for i in range(n)
    ]


def reply(request: dict) -> dict[str, list[str]]:
    return {"required": ["black crown", "white wing bars"], "likely": ["olive back"]}


def serve(delay: float, urls: mp.Queue, stop: mp.Event) -> None:
    """The fake server in its own process, so that it does not share the client's interpreter lock."""
    with FakeOpenAI(reply, delay=delay) as server:
        urls.put(server.url)
        stop.wait()


def run(url: str, n: int, concurrency: int, cache: Path) -> tuple[float, int]:
    start = time.perf_counter()
    stats = extract_attributes(
        concepts(n),
        extractor="llm",
        model="bench-model",
        base_url=url,
        concurrency=concurrency,
        cache=Cache(cache),
        progress=False,
    )
    return time.perf_counter() - start, stats.calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.2)
    args = parser.parse_args()
    urls, stop = mp.Queue(), mp.Event()
    server = mp.Process(target=serve, args=(args.delay, urls, stop), daemon=True)
    server.start()
    url = urls.get(timeout=60)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sequential, calls_1 = run(url, args.concepts, 1, Path(tmp) / "c1")
            concurrent, calls_16 = run(url, args.concepts, 16, Path(tmp) / "c16")
            rerun, calls_rerun = run(url, args.concepts, 16, Path(tmp) / "c16")
    finally:
        stop.set()
        server.join(timeout=10)
    ratio = concurrent / sequential
    print(f"concepts          {args.concepts} (server delay {args.delay * 1000:.0f} ms)")
    print(f"concurrency 1     {sequential:.1f} s, {calls_1} calls")
    print(f"concurrency 16    {concurrent:.1f} s, {calls_16} calls: {ratio:.3f} of sequential (goal <= 0.1)")
    print(f"re-run (cached)   {rerun:.2f} s, {calls_rerun} calls (goal < 2 s, 0 calls)")
    print("PASS" if ratio <= 0.1 and rerun < 2 and calls_rerun == 0 else "FAIL")


if __name__ == "__main__":
    main()
