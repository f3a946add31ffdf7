"""Benchmark: mining CLIP hard-negative distractors for iNat-2021-scale class counts (text space).

For each size N it writes N synthetic concepts (iNat-like: "Genus epithet" names, 20 species per family
group, seven superordinates), then, in a fresh process, runs `finer.eval.distractors.mine_neighbours` with the
tiny random-weight CLIP of `finer.testing` and reports, separately, the text embedding, the blocked k-NN
(`blocked_nearest`) and the whole call (embedding + k-NN at every level + the stored files; wall and CPU
seconds, the CPU time being the figure a shared machine disturbs least), the peak
resident memory the call added, and the size of the stored files. A second run of the same call must read
the store back (no model) and is timed too. Last, the k-NN alone on random 768-dimensional embeddings (the
width of openai/clip-vit-large-patch14) at half, once and twice the largest size shows what the real model's
vectors cost to search.

    .venv/bin/python bench/distractor_mining.py [--sizes 1000,2000,5000,10000] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUPERORDINATES = ("Plants", "Insects", "Birds", "Fungi", "Reptiles", "Mammals", "Ray-finned Fishes")
SYLLABLES = ("ra", "to", "mi", "phe", "lu", "can", "dor", "si", "xan", "bel", "or", "tus", "ga", "ne", "pho")


def word(index: int, length: int) -> str:
    """A pseudo-Latin word: ``index`` written in base len(SYLLABLES), one syllable per digit."""
    parts = []
    for _ in range(length):
        index, digit = divmod(index, len(SYLLABLES))
        parts.append(SYLLABLES[digit])
    return "".join(parts)


def concepts(n: int) -> list[dict[str, object]]:
    """N distinct species; each family group holds 20 of them."""
    rows = []
    for i in range(n):
        family = i // 20
        rows.append(
            {
                "superordinate": SUPERORDINATES[family % len(SUPERORDINATES)],
                "coarse": [f"{word(family, 3).capitalize()}idae"],
                "fine": [f"{word(family, 2).capitalize()}us {word(i, 4)}"],
            }
        )
    return rows


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def start_peak() -> float:
    """Reset the peak resident size (Linux: clear_refs 5) and return the current one, in MiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mib("VmRSS")


def added_peak(start: float) -> float:
    """MiB the peak resident size rose above ``start`` since `start_peak`."""
    return _status_mib("VmHWM") - start


def child(n: int, clip: str, threads: int) -> dict[str, object]:
    """One size, measured in this (fresh) process."""
    import torch
    import transformers  # noqa: F401  # imported before the clock starts: a one-off cost, not mining's

    from finer.eval import distractors

    torch.set_num_threads(threads)
    transformers.AutoModel, transformers.AutoTokenizer, transformers.AutoImageProcessor  # noqa: B018
    rows = concepts(n)
    assert len({r["fine"][0] for r in rows}) == n  # type: ignore[index]
    timings: dict[str, float] = {}
    embed, knn = distractors._text_embeddings, distractors.blocked_nearest

    def timed(name: str, function):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            started = time.perf_counter()
            result = function(*args, **kwargs)
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - started
            return result

        return wrapper

    distractors._text_embeddings = timed("embed_s", embed)
    distractors.blocked_nearest = timed("knn_s", knn)
    with tempfile.TemporaryDirectory() as folder:
        before = start_peak()
        started, cpu = time.perf_counter(), time.process_time()
        mined = distractors.mine_neighbours(folder, rows, model=clip, device="cpu", batch_size=256)
        total, cpu = time.perf_counter() - started, time.process_time() - cpu
        peak = added_peak(before)
        started = time.perf_counter()
        again = distractors.mine_neighbours(folder, rows, model=clip, device="cpu")
        reread = time.perf_counter() - started
        assert again.reused and not mined.reused
        sizes = {p.suffix: p.stat().st_size for p in mined.path.parent.iterdir()}
    return {
        "n": n,
        "threads": threads,
        "embed_s": round(timings["embed_s"], 2),
        "knn_s": round(timings["knn_s"], 2),
        "total_s": round(total, 2),
        "total_cpu_s": round(cpu, 2),
        "reuse_s": round(reread, 2),
        "added_peak_rss_mib": round(peak),
        "json_mib": round(sizes[".json"] / 2**20, 2),
        "safetensors_mib": round(sizes[".safetensors"] / 2**20, 2),
    }


def knn_768(n: int, threads: int) -> dict[str, object]:
    """The k-NN alone on random 768-wide vectors (CLIP ViT-L/14's projection width)."""
    import torch

    from finer.eval.distractors import KEEP, blocked_nearest

    torch.set_num_threads(threads)
    vectors = torch.randn(n, 768, generator=torch.Generator().manual_seed(0))
    before = start_peak()
    started, cpu = time.perf_counter(), time.process_time()
    blocked_nearest(vectors, KEEP)
    return {
        "n": n,
        "dim": 768,
        "knn_s": round(time.perf_counter() - started, 2),
        "knn_cpu_s": round(time.process_time() - cpu, 2),
        "added_peak_rss_mib": round(added_peak(before)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,2000,5000,10000")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--clip", help=argparse.SUPPRESS)
    parser.add_argument("--knn768", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.clip, args.threads)))
        return
    if args.knn768:
        print(json.dumps(knn_768(args.knn768, args.threads)))
        return
    from finer.testing.tiny_parts import build_tiny_clip

    with tempfile.TemporaryDirectory() as folder:
        clip = str(build_tiny_clip(Path(folder) / "clip"))
        runs = []
        for n in (int(s) for s in args.sizes.split(",")):
            command = [
                sys.executable,
                __file__,
                "--child",
                str(n),
                "--clip",
                clip,
                "--threads",
                str(args.threads),
            ]
            runs.append(
                json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            )
            print(json.dumps(runs[-1]), flush=True)
    largest = max(int(s) for s in args.sizes.split(","))
    for n in (largest // 2, largest, 2 * largest):
        command = [sys.executable, __file__, "--knn768", str(n), "--threads", str(args.threads)]
        print(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
