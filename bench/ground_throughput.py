"""Throughput benchmark of `finer ground` against an OpenAI-compatible endpoint: concurrency 16 vs 1.

The fake server (its own process, as a real endpoint would be) answers every request after 200 ms with a
verdict for every listed attribute. The dataset has `--images` rows (1,000 by default) of distinct 64x64
images, four attributes each, so no two requests share a cache key; each run gets a fresh cache and a fresh
`--out`, so every image costs one call. Goal: concurrency 16 grounds >= 10x the images per second.

Each measurement is a whole `finer.data.grounding.ground` call: planning, image decoding and encoding, the
calls, the append-only results file, writing the new dataset and grounding.json.

    .venv/bin/python bench/ground_throughput.py [--images N] [--concurrency N]
"""

from __future__ import annotations

import argparse
import io
import random
import tempfile
import time
from pathlib import Path

import datasets
from _common import fake_endpoint  # bench/_common.py: a script's own folder is on sys.path
from PIL import Image

from finer.data.grounding import GroundConfig, ground
from finer.schema import image_features

LATENCY_S = 0.2
ATTRIBUTES = ["black crown", "white wing bars", "yellow rump", "streaked breast"]

#: The fake endpoint's reply: every listed attribute visible (Python source: it runs in its own process).
ANSWER = """
def answer(request):
    schema = (request.get("response_format") or {}).get("json_schema", {}).get("schema", {})
    return {name: "visible" for name in schema.get("properties", {})}
"""


def write_dataset(out: Path, images: int) -> Path:
    """A built-dataset folder (the docs/design.md §3 columns) with `images` embedded PNGs of seeded noise
    (distinct
    after JPEG encoding, unlike flat colours a shade apart) in one split."""
    rows = []
    for n in range(images):
        buffer = io.BytesIO()
        Image.frombytes("RGB", (64, 64), random.Random(n).randbytes(64 * 64 * 3)).save(buffer, format="PNG")
        rows.append(
            {
                "image": {"bytes": buffer.getvalue(), "path": None},
                "image_id": str(n),
                "source": "bench",
                "concept_id": f"c{n % 10}",
                "superordinate": "Bird",
                "coarse": ["Warbler"],
                "fine": [f"Warbler {n % 10}"],
                "label": n % 10,
                "attributes_required": ATTRIBUTES,
                "attributes_likely": [],
                "bbox": None,
            }
        )
    features = image_features([f"Warbler {i}" for i in range(10)])
    split = datasets.Dataset.from_list(rows, features=features)
    datasets.DatasetDict({"test": split}).save_to_disk(str(out))
    return out


def timed(config: GroundConfig) -> float:
    """Images grounded per second by one whole `ground` run."""
    started = time.perf_counter()
    summary = ground(config)
    elapsed = time.perf_counter() - started
    grounded = summary["images"]["grounded"]
    assert summary["calls"] == grounded and summary["images"]["failed"] == 0, summary["images"]
    return grounded / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="Images grounded per run.")
    parser.add_argument("--concurrency", type=int, default=16, help="Concurrency of the fast run.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="finer-bench-ground-") as tmp:
        work = Path(tmp)
        data = write_dataset(work / "data", args.images)
        rates = {}
        with fake_endpoint(ANSWER, LATENCY_S) as endpoint:
            url = endpoint.url
            # warm-up: imports, the first template render and dataset write
            warm = GroundConfig(str(data), work / "warm", "fake-vlm", base_url=url, limit=2, progress=False)
            warm.cache = work / "cache-warm"
            ground(warm)
            for concurrency in (args.concurrency, 1):
                config = GroundConfig(
                    dataset=str(data),
                    out=work / f"out-{concurrency}",
                    model="fake-vlm",
                    base_url=url,
                    concurrency=concurrency,
                    cache=work / f"cache-{concurrency}",
                    progress=False,
                )
                rates[concurrency] = timed(config)
    assert endpoint.peak is not None and endpoint.peak <= args.concurrency, endpoint.peak
    gain = rates[args.concurrency] / rates[1]
    print(f"finer ground, {args.images} images, fake endpoint answering in {LATENCY_S * 1000:.0f} ms:")
    print(f"  concurrency 1: {rates[1]:7.2f} img/s ({args.images / rates[1]:6.1f} s)")
    print(
        f"  concurrency {args.concurrency}: {rates[args.concurrency]:7.2f} img/s "
        f"({args.images / rates[args.concurrency]:6.1f} s)   gain {gain:5.1f}x (goal >= 10x)"
    )
    print(f"  peak requests in flight: {endpoint.peak}")
    print("PASS" if gain >= 10 else "FAIL")


if __name__ == "__main__":
    main()
