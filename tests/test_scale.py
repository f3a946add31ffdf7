"""Cost and scale end to end (issue 18), against the fake OpenAI-compatible server: `--dry-run` projects what
the real run then bills, `--max-cost` stops within one call of the budget, `--rpm`/`--tpm` hold across
32 workers, a 429 pauses the whole run, and two endpoints with one killed halfway lose and double nothing.
The synthetic CUB copy and its grounding replies are test_grounding's."""

from __future__ import annotations

import asyncio
import itertools
import json
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
from test_grounding import built, cub, grounder  # noqa: F401 - fixtures used by name

from finer.cache import Cache
from finer.cli import OVER_BUDGET_EXIT, main
from finer.data.grounding import GroundConfig, ground
from finer.models import endpoints
from finer.models.client import ChatClient, Usage
from finer.models.policy import Projection, RunPolicy, use_policy
from finer.models.pricing import PriceTable
from finer.models.ratelimit import CATCH_UP_S, RateLimiter
from finer.models.tokens import count_request
from finer.testing.fake_openai import FakeOpenAI, Fault, billed_tokens

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
    """Text within 10 % of what the server bills with gpt-4o's tokenizer, image tokens exactly by the
    tile rule, calls equal."""
    policy = RunPolicy(projection=Projection())
    with FakeOpenAI(grounder, count_tokens=billed_tokens, bill_images=True) as server:
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
    with FakeOpenAI(grounder, count_tokens=billed_tokens, bill_images=True) as server:
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


def test_dry_run_and_max_cost_where_no_call_is_made(
    built: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A step whose every call is projected (or refused by the budget) stops; the command still ends with
    the projection (exit 0) or the budget's line (exit 3), never a bare 'every request failed'."""
    with FakeOpenAI(grounder) as server:
        argv = ground_argv(built, tmp_path / "g", server, tmp_path / "c", "--limit", "1")
        assert run_main([*argv, "--dry-run"]) == 0
        assert "ground_attributes @ gpt-4o: 2 calls" in capsys.readouterr().out
        assert run_main([*argv, "--max-cost", "0.000000001"]) == OVER_BUDGET_EXIT
        assert server.count == 0
    assert "stopped at --max-cost" in capsys.readouterr().err


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


# --- 2. rate limits held by all workers together ----------------------------------------------------


def ask_many(urls: str, calls: int, *, concurrency: int, clients: int = 1, max_tokens: int = 20) -> Usage:
    """`calls` different requests from `clients` clients of `concurrency` workers each, all at once."""
    usage = Usage()

    async def run() -> None:
        chats = [
            ChatClient(MODEL, urls, cache=Cache(tempfile.mkdtemp()), usage=usage, concurrency=concurrency)
            for _ in range(clients)
        ]
        try:
            await asyncio.gather(
                *(
                    chats[i % clients].reply(
                        [{"role": "user", "content": f"question {i}: " + "word " * (i % 7)}],
                        template_sha256="t",
                        max_tokens=max_tokens,
                    )
                    for i in range(calls)
                )
            )
        finally:
            for chat in chats:
                await chat.__aexit__()

    asyncio.run(run())
    return usage


def test_rpm_and_tpm_hold_across_32_workers_of_two_clients() -> None:
    """From the server's request log: requests are paced at --rpm and tokens at --tpm, whoever sends."""
    rpm, tpm = 600.0, 12_000.0
    with FakeOpenAI(lambda request: "ok") as server:
        with use_policy(RunPolicy(limiter=RateLimiter(rpm=rpm))):
            ask_many(server.url, 40, concurrency=16, clients=2)
        times = sorted(entry["time"] for entry in server.requests)
    assert len(times) == 40
    for i, j in itertools.combinations(range(len(times)), 2):
        # the first request, and what late sends may catch up, are the only slack
        assert j - i <= (times[j] - times[i]) * rpm / 60 + 1 + CATCH_UP_S * rpm / 60, (i, j)
    assert (times[-1] - times[0]) * rpm / 60 == pytest.approx(39, rel=0.05)

    with FakeOpenAI(lambda request: "ok") as server:
        with use_policy(RunPolicy(limiter=RateLimiter(tpm=tpm))):
            ask_many(server.url, 30, concurrency=32)
        log = sorted(server.requests, key=lambda entry: entry["time"])
    tokens = [count_request(MODEL, e["json"]["messages"]).total + e["json"]["max_tokens"] for e in log]
    for i, j in itertools.combinations(range(len(log)), 2):
        sent = sum(tokens[i:j])  # the tokens of i..j-1 must have been paced out before j went
        assert sent <= (log[j]["time"] - log[i]["time"]) * tpm / 60 + CATCH_UP_S * tpm / 60 + 1, (i, j)


def test_a_429_pauses_the_whole_run(capsys: pytest.CaptureFixture[str]) -> None:
    """One request gets a 429 asking for 2 s: no worker sends anything until they have passed."""
    count, limited = itertools.count(), []

    def responder(request: dict[str, Any]) -> Any:
        if next(count) == 20:
            limited.append(request)
            return Fault(status=429, headers=(("x-ratelimit-reset-requests", "2s"),), message="slow down")
        return "ok"

    with FakeOpenAI(responder, delay=0.05) as server, use_policy(RunPolicy()):
        usage = ask_many(server.url, 80, concurrency=16)
    assert usage.calls == 80 and usage.failed_calls == 0
    # the 429 left the server 0.05 s after its request arrived; what was sent before it came back may land
    # a little later (a loaded machine), so the check starts 0.4 s on and ends 0.2 s early
    start = next(e["time"] for e in server.requests if e["json"] is limited[0]) + 0.05 + 0.4
    during = [round(e["time"] - start, 3) for e in server.requests if start < e["time"] < start + 1.4]
    assert not during, f"requests sent while the run was paused, at +{during} s"
    assert "the whole run pauses 2.0 s" in capsys.readouterr().out


# --- 4. several endpoints --------------------------------------------------------------------------


def echo(request: dict[str, Any]) -> str:
    return request["messages"][-1]["content"]


def test_two_endpoints_one_dies_halfway_nothing_lost_nothing_doubled(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Replica `a` stops answering after 20 replies and answers again a second later: every request is
    answered exactly once, by `a` or `b`, with its own reply; `a` is taken out, then back in rotation."""
    monkeypatch.setattr(endpoints, "COOLDOWN_S", 0.3)
    served = itertools.count()

    def dies(request: dict[str, Any]) -> str:
        if next(served) == 19:
            a.answering = False
            threading.Timer(1.0, lambda: setattr(a, "answering", True)).start()
        return echo(request)

    questions = [f"question {i}" for i in range(200)]
    usage = Usage()
    with FakeOpenAI(dies, delay=0.02) as a, FakeOpenAI(echo, delay=0.02) as b:

        async def run() -> list[str]:
            async with ChatClient(
                MODEL,
                f"{a.url},{b.url}",
                cache=Cache(tempfile.mkdtemp()),
                usage=usage,
                concurrency=4,
                max_retries=1,
            ) as chat:
                assert chat.capacity == 8
                replies = [
                    chat.reply([{"role": "user", "content": q}], template_sha256="t") for q in questions
                ]
                return [reply.text for reply in await asyncio.gather(*replies)]

        answers = asyncio.run(run())
        asked = [echo(entry["json"]) for entry in a.requests + b.requests]
    assert answers == questions  # nothing lost, each its own reply
    assert sorted(asked) == sorted(questions)  # nothing answered twice
    assert a.dropped and usage.failed_calls == 0
    calls = usage.usage_json()["calls_per_endpoint"]
    assert calls == {a.url + "/": len(a.requests), b.url + "/": len(b.requests)}
    assert len(a.requests) > 20, "replica a was never put back in rotation"
    printed = capsys.readouterr().out
    assert "does not answer: out of rotation" in printed and "back in rotation" in printed


# --- 5. the client's own cost per call (bench/scale.py: two endpoints vs one) -------------------------


def test_a_call_sends_what_create_would_without_walking_the_typed_request(monkeypatch) -> None:
    """The body and key a call sends are exactly what `chat.completions.create` would send (the `openai`
    client's walk of the typed request leaves finer's plain-JSON requests unchanged), but that walk, a
    third of the client's CPU at 32 calls in flight, is not made."""
    from openai._utils._transform import async_maybe_transform
    from openai.resources.chat.completions import completions
    from openai.types.chat.completion_create_params import CompletionCreateParamsNonStreaming

    walks = []
    real_walk = completions.async_maybe_transform

    async def counted_walk(*args: Any, **kwargs: Any) -> Any:
        walks.append(args)
        return await real_walk(*args, **kwargs)

    monkeypatch.setattr(completions, "async_maybe_transform", counted_walk)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-key")
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    image = "data:image/jpeg;base64,/9j/4AAQ"
    messages = [
        {"role": "system", "content": "look"},
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "a?"}],
        },
    ]

    async def run(url: str) -> None:
        async with ChatClient(MODEL, url, cache=Cache(tempfile.mkdtemp())) as chat:
            await chat.reply(messages, template_sha256="t", schema=schema, max_tokens=7)

    with FakeOpenAI(lambda request: {"a": "b"}) as server:
        asyncio.run(run(server.url))
    (entry,) = server.requests
    sent = entry["json"]
    expected = {
        "model": MODEL,
        "messages": messages,
        "temperature": 0.0,
        "max_tokens": 7,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "reply", "schema": schema, "strict": True},
        },
    }
    assert sent == expected
    assert asyncio.run(async_maybe_transform(sent, CompletionCreateParamsNonStreaming)) == sent
    assert entry["headers"]["authorization"] == "Bearer sk-test-key"
    assert not walks


def test_writing_a_cache_entry_holds_up_no_other_call() -> None:
    """Creating an entry's file can take a millisecond or more (this machine's ext4): it happens off the
    event loop, so the other calls go on meanwhile; a reply still returns only once its entry is written."""
    import time

    class SlowCache(Cache):
        def put(self, namespace: str, key: str, value: Any) -> None:
            time.sleep(0.25)
            super().put(namespace, key, value)
            written.append(key)

    written: list[str] = []

    cache = SlowCache(tempfile.mkdtemp())
    returned = []

    async def ask(chat: ChatClient, i: int) -> None:
        await chat.reply([{"role": "user", "content": f"question {i}"}], template_sha256="t")
        returned.append(len(written))  # entries written when the i-th reply came back

    async def run(url: str) -> None:
        async with ChatClient(MODEL, url, cache=cache, concurrency=4) as chat:
            await asyncio.gather(*(ask(chat, i) for i in range(4)))

    with FakeOpenAI(lambda request: "ok") as server:
        started = time.perf_counter()
        asyncio.run(run(server.url))
        elapsed = time.perf_counter() - started
    assert all(written >= n for n, written in enumerate(returned, 1)), returned
    assert len(list((cache.root / "llm").rglob("*.json"))) == 4
    assert elapsed < 0.75, f"4 entries of 0.25 s each took {elapsed:.2f} s: written one after another"


def slowed(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, seconds: float) -> None:
    """`module.name` taking `seconds` longer each time (a slow image to read and encode), in whatever
    thread it runs."""
    import time

    real = getattr(module, name)

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, slow)


def assert_back_to_back(server: FakeOpenAI, calls: int, call_s: float, prepare_s: float) -> None:
    """At --concurrency 1, `calls` calls of `call_s` each never overlapped and followed one another with no
    gap for the `prepare_s` of preparing the next: the first to the last started closer to `calls - 1`
    calls apart than to `calls - 1` calls and preparations apart."""
    times = sorted(entry["time"] for entry in server.requests)
    assert len(times) == calls and server.max_in_flight == 1
    back_to_back, prepared_between = (calls - 1) * call_s, (calls - 1) * (call_s + prepare_s)
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(times)]
    assert times[-1] - times[0] < (back_to_back + prepared_between) / 2, gaps


def test_ground_keeps_its_endpoint_slots_busy_while_workers_prepare_images(
    built: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker preparing its next image leaves its slot to one that is ready (two workers per slot):
    at --concurrency 1, the calls follow one another with no gap for the image (0.3 s here), and never
    overlap."""
    from finer.data import grounding

    slowed(monkeypatch, grounding, "_image_url", 0.3)
    with FakeOpenAI(grounder, delay=0.4) as server:
        summary = ground(config(built, tmp_path / "g", server, concurrency=1))
    assert summary["calls"] == ASKED
    assert_back_to_back(server, ASKED, call_s=0.4, prepare_s=0.3)
