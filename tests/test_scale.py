"""Cost and scale end to end (issue 18), against the fake OpenAI-compatible server: `--dry-run` projects what
the real run then bills, `--max-cost` stops within one call of the budget, `--rpm`/`--tpm` hold across
32 workers, a 429 pauses the whole run, and two endpoints with one killed halfway lose and double nothing.
The synthetic CUB copy and its grounding replies are test_grounding's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_grounding import built, cub, grounder  # noqa: F401 - fixtures used by name

from finer.cli import OVER_BUDGET_EXIT, main
from finer.data.grounding import GroundConfig, ground
from finer.models.policy import Projection, RunPolicy, use_policy
from finer.models.pricing import PriceTable
from finer.testing.fake_openai import FakeOpenAI, pretokens

MODEL = "gpt-4o"
#: Images of the synthetic CUB copy with attributes to ask about (test_grounding: 8, one unreadable).
ASKED = 7


def config(
    dataset: Path, out: Path, server: FakeOpenAI, cache: Path | None = None, **extra: Any
) -> GroundConfig:
    return GroundConfig(
        dataset=str(dataset),
        out=out,
        model=MODEL,
        base_url=server.url,
        cache=cache or out.parent / "cache",
        progress=False,
        **extra,
    )


def run_main(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    return int(exit_.value.code or 0)


def ground_argv(dataset: Path, out: Path, server: FakeOpenAI, cache: Path, *extra: str) -> list[str]:
    return [
        "ground",
        str(dataset),
        "--out",
        str(out),
        "--model",
        MODEL,
        "--base-url",
        server.url,
        "--cache",
        str(cache),
        *extra,
    ]


def cached_costs(cache: Path) -> list[float]:
    """USD of each call a run made, read back from its cache entries (their billed tokens)."""
    prices = PriceTable()
    costs = []
    for path in (cache / "llm").rglob("*.json"):
        value = json.loads(path.read_text())["value"]
        costs.append(prices.cost(MODEL, value["prompt_tokens"], value["completion_tokens"]))
    return costs


# --- 1. know the cost before spending it ----------------------------------------------------------


def test_dry_run_projects_the_tokens_the_real_run_is_billed(built: Path, tmp_path: Path) -> None:  # noqa: F811
    """Text within 10 % of a tokenizer-like count, image tokens exactly by the tile rule, calls equal."""
    policy = RunPolicy(projection=Projection())
    with FakeOpenAI(grounder, count_tokens=pretokens, bill_images=True) as server:
        with use_policy(policy):
            ground(config(built, tmp_path / "dry", server))
        assert server.count == 0, "a dry run sent a request"
        real = ground(config(built, tmp_path / "real", server))
    with FakeOpenAI(grounder, count_tokens=lambda text: 0, bill_images=True) as images_only:
        billed_images = ground(config(built, tmp_path / "img", images_only, cache=tmp_path / "c2"))
    step = policy.projection.to_json(policy.prices)["steps"][f"ground_attributes @ {MODEL}"]
    assert step["calls"] == real["calls"] > 0 and step["cached_calls"] == 0
    text = real["prompt_tokens"] - billed_images["prompt_tokens"]
    assert abs(step["input_text_tokens"] - text) <= 0.10 * text, (step, text)
    assert step["input_image_tokens"] == billed_images["prompt_tokens"]
    assert step["image_tokens_counted"] == "tile rule"


def test_dry_run_cli_counts_cached_calls_apart_and_sends_nothing(
    built: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cache = tmp_path / "cache"
    with FakeOpenAI(grounder) as server:
        first = run_main(ground_argv(built, tmp_path / "half", server, cache, "--limit", "2"))
        done = server.count
        assert first == 0 and done > 0
        capsys.readouterr()
        code = run_main(ground_argv(built, tmp_path / "all", server, cache, "--dry-run"))
        assert server.count == done, "a dry run sent a request"
    assert code == 0 and not (tmp_path / "all").exists()
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if "ground_attributes" in line)
    assert f"{ASKED - done} calls ({done} cached, free)" in row, row
    assert "mean of" in printed  # output tokens from the cached replies
    assert "dry run: nothing was sent" in printed


def test_max_cost_stops_within_one_call_of_the_budget_and_resumes(
    built: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with FakeOpenAI(grounder, count_tokens=pretokens, bill_images=True) as server:
        assert run_main(ground_argv(built, tmp_path / "ref", server, tmp_path / "ref-cache")) == 0
        costs = cached_costs(tmp_path / "ref-cache")
        budget = sum(sorted(costs)[:4]) + 0.5 * min(costs)
        argv = ground_argv(built, tmp_path / "g", server, tmp_path / "cache", "--concurrency", "1")
        code = run_main([*argv, "--max-cost", f"{budget:.8f}"])
        err = capsys.readouterr().err
        assert code == OVER_BUDGET_EXIT
        assert f"stopped at --max-cost {budget:.8f}"[:30] in err and "not started" in err
        spent = sum(cached_costs(tmp_path / "cache"))
        assert budget - max(costs) < spent <= budget
        summary = json.loads((tmp_path / "g" / "grounding.json").read_text())
        assert summary["images"]["failed"] == len(costs) - summary["calls"] > 0
        before = server.count
        assert run_main([*argv, "--overwrite"]) == 0  # no budget: the rest, none twice
        assert server.count - before == len(costs) - summary["calls"]


def test_max_cost_refuses_a_model_without_a_price(
    built: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def argv(server: FakeOpenAI, *extra: str) -> list[str]:
        args = ground_argv(built, tmp_path / "g", server, tmp_path / "c", "--max-cost", "1", *extra)
        args[args.index(MODEL)] = "my-local-vlm"
        return args

    with FakeOpenAI(grounder) as server:
        assert run_main(argv(server)) == 2
        assert server.count == 0
    assert "--prices FILE" in capsys.readouterr().err
    prices = tmp_path / "prices.yaml"
    prices.write_text("my-local-vlm: {input: 0.1, output: 0.1}\n")
    with FakeOpenAI(grounder) as server:
        assert run_main(argv(server, "--prices", str(prices))) == 0
        assert server.count == ASKED
