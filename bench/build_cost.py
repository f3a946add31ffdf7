"""Projected versus actual cost of a 200-concept `finer build --knowledge` (issue 18, Done when).

The build asks two things per concept of an OpenAI-compatible endpoint at gpt-4o-mini's list prices (the
built-in table): its coarse group and its attributes from the Wikipedia text. The fake MediaWiki serves a
page per concept of seeded, varied prose (80 to 600 words; the build sends the first `wiki_words`); the
fake endpoint bills text with gpt-4o-mini's tokenizer (tiktoken's o200k_base) and answers with a
seeded, varied number of attributes (3 to 12), so replies differ in length as real ones do.

Three projections, each compared with the tokens and USD the endpoint then bills:
1. cold: `--dry-run` with an empty cache (output tokens projected at 256 a call, said as an estimate);
2. after a 20-concept sample build into the same cache: `--dry-run` of all 200 (20 cached, free; the other
   180 projected at the sample's measured mean output);
3. the real build of all 200 (its 360 new calls), against projection 2.

    .venv/bin/python bench/build_cost.py [--concepts N] [--sample N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

from finer.data.build import BuildConfig, build
from finer.data.knowledge import KnowledgeOptions
from finer.errors import FinerError
from finer.models.policy import Projection, RunPolicy, use_policy
from finer.models.pricing import PriceTable
from finer.testing.fake_mediawiki import FakeMediaWiki, FakePage
from finer.testing.fake_openai import FakeOpenAI, billed_tokens

MODEL = "gpt-4o-mini"
WORDS = [
    "crown",
    "wing",
    "bar",
    "breast",
    "rump",
    "tail",
    "throat",
    "nape",
    "eye",
    "ring",
    "streak",
    "patch",
    "buff",
    "olive",
    "rufous",
    "slate",
]
PROSE = [
    "the",
    "a",
    "of",
    "with",
    "and",
    "is",
    "has",
    "its",
    "on",
    "in",
    "small",
    "large",
    "bright",
    "dull",
    "short",
    "long",
    "pale",
    "dark",
]


def concept(n: int) -> str:
    return f"Bench Warbler {n:03d}"


def page(n: int) -> FakePage:
    """A page of seeded prose, 80 to 600 words, so prompts differ in length."""
    rng = random.Random(n)
    words = [rng.choice(WORDS + PROSE) for _ in range(rng.randint(80, 600))]
    return FakePage.article(f"The {concept(n)} is a songbird.", {"Description": " ".join(words) + "."})


def answer(request: dict[str, Any]) -> Any:
    """A coarse group for the coarse-label prompt, else 3 to 12 attributes seeded by the concept asked."""
    text = json.dumps(request["messages"])
    if "Group:" in text:
        return "Warbler"
    n = int(text.split("Bench Warbler ", 1)[1][:3])
    rng = random.Random(-n)
    attributes = [f"{rng.choice(PROSE[10:])} {rng.choice(WORDS)}" for _ in range(rng.randint(3, 12))]
    half = len(attributes) // 2 + 1
    return {"required": attributes[:half], "likely": attributes[half:]}


def image_folder(root: Path, concepts: range) -> Path:
    for n in concepts:
        folder = root / "train" / concept(n).replace(" ", "_")
        folder.mkdir(parents=True)
        Image.new("RGB", (8, 8), "blue").save(folder / "0.jpg")
    return root


def config(root: Path, out: Path, wiki: str, llm: str, cache: Path) -> BuildConfig:
    options = KnowledgeOptions(model=MODEL, base_url=llm, wiki_api=wiki, cache=cache, extractor="llm")
    return BuildConfig(source="imagefolder", root=root, out=out, knowledge=True, knowledge_options=options)


def projected(build_config: BuildConfig) -> dict[str, Any]:
    """The dry run's projection of a build (nothing sent to the endpoint)."""
    policy = RunPolicy(projection=Projection())
    with use_policy(policy), contextlib.suppress(FinerError):  # "every request failed": all counted
        build(build_config)
    return policy.projection.to_json(policy.prices)


def billed(cache: Path, before: set[Path]) -> tuple[int, int, int, float]:
    """Calls, input and output tokens billed, and their USD, of the replies cached since `before`."""
    prices, calls, tokens_in, tokens_out, usd = PriceTable(), 0, 0, 0, 0.0
    for path in set((cache / "llm").rglob("*.json")) - before:
        value = json.loads(path.read_text())["value"]
        calls += 1
        tokens_in += value["prompt_tokens"]
        tokens_out += value["completion_tokens"]
        usd += prices.cost(MODEL, value["prompt_tokens"], value["completion_tokens"])
    return calls, tokens_in, tokens_out, usd


def line(name: str, projection: dict[str, Any]) -> str:
    steps = projection["steps"].values()
    text = sum(step["input_text_tokens"] for step in steps)
    output = sum(step["output_tokens"] for step in steps)
    return (
        f"   {name}: {projection['calls']} calls + {projection['cached_calls']} cached; input {text} "
        f"(text tokens counted by: {', '.join(sorted({s['text_tokens_counted'] for s in steps}))}); "
        f"output {output} ({'; '.join(sorted({s['output_tokens_from'] for s in steps}))}); "
        f"{projection['usd']} USD"
    )


def compare(projection: dict[str, Any], actual: tuple[int, int, int, float]) -> str:
    steps = projection["steps"].values()
    tokens_in = sum(step["input_text_tokens"] + step["input_image_tokens"] for step in steps)
    output = sum(step["output_tokens"] for step in steps)
    calls, real_in, real_out, usd = actual
    return (
        f"calls {projection['calls']} vs {calls}; input {100 * (tokens_in / real_in - 1):+.2f} %, "
        f"output {100 * (output / real_out - 1):+.2f} %, USD {100 * (projection['usd'] / usd - 1):+.2f} %"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, default=200)
    parser.add_argument("--sample", type=int, default=20)
    args = parser.parse_args()
    pages = {concept(n): page(n) for n in range(args.concepts)}
    with (
        tempfile.TemporaryDirectory(prefix="finer-bench-") as scratch,
        FakeMediaWiki(pages) as wiki,
        FakeOpenAI(answer, count_tokens=billed_tokens) as llm,
    ):
        work = Path(scratch)
        cache = work / "cache"
        everything = image_folder(work / "all", range(args.concepts))
        sample = image_folder(work / "sample", range(args.sample))
        cold = projected(config(everything, work / "dry-cold", wiki.url, llm.url, cache))
        assert llm.count == 0, "a dry run sent a request"
        cold_sample = projected(config(sample, work / "dry-sample", wiki.url, llm.url, cache))
        build(config(sample, work / "sample-out", wiki.url, llm.url, cache))
        sample_billed = billed(cache, set())
        warm = projected(config(everything, work / "dry-warm", wiki.url, llm.url, cache))
        before = set((cache / "llm").rglob("*.json"))
        build(config(everything, work / "all-out", wiki.url, llm.url, cache))
        rest_billed = billed(cache, before)
    everything_billed = tuple(a + b for a, b in zip(sample_billed, rest_billed, strict=True))
    print(f"build --knowledge of {args.concepts} concepts, {MODEL} at the built-in list prices:")
    print(line("cold dry run", cold))
    print(f"     vs the whole build's calls: {compare(cold, everything_billed)}")
    print(line(f"cold dry run of the {args.sample}-concept sample", cold_sample))
    print(f"     vs the sample's calls: {compare(cold_sample, sample_billed)}")
    print(line(f"dry run after the {args.sample}-concept sample", warm))
    print(f"     vs the calls the build then made: {compare(warm, rest_billed)}")
    print(
        f"   billed: sample {sample_billed[0]} calls {sample_billed[3]:.6f} USD; "
        f"rest {rest_billed[0]} calls {rest_billed[3]:.6f} USD"
    )


if __name__ == "__main__":
    main()
