"""Scale benchmark for the inat2021 source: `finer build` over an iNat-2021-shaped train.json.

Writes 10,000 categories and 500,000 image records (by default) in the official format, each category
with its own image folder holding a few real 8x8 JPEGs that many records share, then runs
`finer build inat2021 --no-knowledge` under `/usr/bin/time -v` and prints rows/s and peak RSS.
Goal: >= 10,000 rows/s and < 1.5 GB peak RSS for the whole build.

    .venv/bin/python bench/inat_scale.py [--categories N] [--images N] [--check-images] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "specific_epithet")
SUPERCATEGORIES = ("Plants", "Insects", "Birds", "Fungi", "Reptiles", "Mammals", "Ray-finned Fishes")


def category(index: int) -> dict[str, object]:
    """A category with every field the real file has; family/genus shared by runs of ids, as in iNat."""
    ranks = [
        "Animalia",
        f"Phylum{index % 7}",
        f"Class{index % 31}",
        f"Order{index % 97}",
        f"Family{index // 8}",
        f"Genus{index // 3}",
        f"epithet{index}",
    ]
    return {
        "id": index,
        "name": f"{ranks[5]} {ranks[6]}",
        "common_name": f"Common Thing {index}",
        "supercategory": SUPERCATEGORIES[index % len(SUPERCATEGORIES)],
        **dict(zip(RANKS, ranks, strict=True)),
        "image_dir_name": "_".join([f"{index:05d}", *ranks]),
    }


def write_dataset(root: Path, categories: int, images: int, files_per_category: int) -> None:
    """train.json plus `files_per_category` real JPEGs per category folder (records cycle over them)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 140, 60)).save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    cats = [category(i) for i in range(categories)]
    for cat in cats:
        folder = root / "train" / str(cat["image_dir_name"])
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(files_per_category):
            (folder / f"{k}.jpg").write_bytes(jpeg)
    with (root / "train.json").open("w", encoding="utf-8") as out:
        out.write('{"info": {"year": 2021, "version": "2021"}, "images": [')
        for i in range(images):
            cat = cats[i * categories // images]
            image = {
                "id": i + 1,
                "width": 8,
                "height": 8,
                "file_name": f"train/{cat['image_dir_name']}/{i % files_per_category}.jpg",
                "license": 1,
                "rights_holder": f"observer {i % 5000}",
                "date": "2016-07-26 17:39:00+00:00",
                "latitude": 45.0 + i % 90 / 10,
                "longitude": -71.5 - i % 90 / 10,
                "location_uncertainty": 6,
            }
            out.write(("," if i else "") + json.dumps(image))
        out.write('], "categories": ')
        json.dump(cats, out)
        out.write(', "annotations": [')
        for i in range(images):
            annotation = {"id": i + 1, "image_id": i + 1, "category_id": i * categories // images}
            out.write(("," if i else "") + json.dumps(annotation))
        out.write('], "licenses": [{"id": 1, "name": "CC BY"}]}')


def run_build(root: Path, out: Path, check_images: bool) -> tuple[dict, float, float, float]:
    """The build under /usr/bin/time -v: (build.json, wall s, CPU s, peak RSS KiB); NaN if not reported.

    CPU seconds (user + system) are reported beside wall time because on a shared machine wall time
    also measures the neighbours.
    """
    command = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        "-m",
        "finer",
        "build",
        "inat2021",
        "--root",
        str(root),
        "--out",
        str(out),
        "--no-knowledge",
        "--overwrite",
        "--check-images" if check_images else "--no-check-images",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"finer build failed ({done.returncode}):\n{done.stderr[-3000:]}")

    def field(label: str) -> float:
        found = re.search(rf"{label}: ([\d.]+)", done.stderr)
        return float(found.group(1)) if found else float("nan")

    cpu = field(r"User time \(seconds\)") + field(r"System time \(seconds\)")
    summary = json.loads((out / "build.json").read_text())
    return summary, wall, cpu, field(r"Maximum resident set size \(kbytes\)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--categories", type=int, default=10_000)
    parser.add_argument("--images", type=int, default=500_000)
    parser.add_argument("--files-per-category", type=int, default=2)
    parser.add_argument("--check-images", action="store_true", help="open every image (default: skip)")
    parser.add_argument("--workdir", type=Path, help="keep the generated data here (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="inat-scale-") as tmp:
        work = args.workdir or Path(tmp)
        root = work / "inat2021"
        if not (root / "train.json").is_file():
            started = time.perf_counter()
            write_dataset(root, args.categories, args.images, args.files_per_category)
            print(f"wrote {root} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        summary, wall, cpu, peak_kib = run_build(root, work / "out", args.check_images)

    rows = sum(summary["counts"].values())
    print(f"categories       {summary['concepts']}")
    print(f"rows             {rows}")
    print(f"check images     {args.check_images}")
    print(f"wall             {wall:.1f} s (process, including interpreter start); CPU {cpu:.1f} s")
    print(f"rows/s           {rows / wall:,.0f} (whole process); {summary['rows_per_s']:,.0f} (build.json)")
    print(f"rows/CPU-s       {rows / cpu:,.0f}")
    print(f"durations        {summary['durations']}")
    print(f"peak RSS         {peak_kib / 1024:,.0f} MiB")


if __name__ == "__main__":
    main()
