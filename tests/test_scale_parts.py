"""The parts of cost control and scale (issue 18), each on its own: prices, token counts, the rate limiter,
the budget, the dry-run projection and the endpoint pool. The end-to-end checks against the fake server
are in tests/test_scale.py."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from PIL import Image

from finer.errors import FinerError
from finer.models.endpoints import Endpoint, EndpointPool, split_urls
from finer.models.policy import Budget, Projection, RunPolicy
from finer.models.pricing import BUILTIN_PRICES, PRICES_AS_OF, PriceTable
from finer.models.ratelimit import RateLimiter, pause_seconds
from finer.models.tokens import count_request, encoding, image_tokens


def test_builtin_prices_are_dated_and_unknown_models_are_unknown() -> None:
    table = PriceTable()
    assert PRICES_AS_OF in table.source
    assert table.cost("gpt-4o-mini", 1_000_000, 1_000_000) == pytest.approx(0.75)
    assert table.cost("gpt-4o-mini-2024-07-18", 1_000_000, 0) == pytest.approx(0.15)
    assert table.cost("gpt-4o-mini", 1_000_000, 0, batch=True) == pytest.approx(0.075)
    assert table.cost("Qwen/Qwen2.5-VL-7B-Instruct", 10, 10) is None


def test_prices_file_overrides_and_adds(tmp_path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(
        "gpt-4o-mini: {input: 1, output: 2, batch_discount: 0.25}\nmy-vllm: {input: 0, output: 0}\n"
    )
    table = PriceTable.load(path)
    assert table.cost("gpt-4o-mini", 1_000_000, 1_000_000) == pytest.approx(3.0)
    assert table.cost("gpt-4o-mini", 1_000_000, 0, batch=True) == pytest.approx(0.75)
    assert table.cost("my-vllm", 5, 5) == 0.0
    assert table.price("gpt-4o") == BUILTIN_PRICES["gpt-4o"]


@pytest.mark.parametrize(
    "text",
    [
        "gpt-4o: 3",
        "gpt-4o: {input: -1, output: 1}",
        "gpt-4o: {input: 1}",
        "gpt-4o: {input: 1, output: 1, x: 2}",
        "[1",
    ],
)
def test_bad_prices_file_is_one_clear_error(tmp_path, text: str) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(text)
    with pytest.raises(FinerError, match="--prices"):
        PriceTable.load(path)


def test_max_cost_refuses_an_unpriced_model() -> None:
    policy = RunPolicy.from_options(max_cost=1.0)
    policy.check_model("gpt-4o")
    with pytest.raises(FinerError, match="--prices FILE"):
        policy.check_model("some-local-model")


def test_image_tokens_follow_openais_published_examples() -> None:
    # OpenAI's vision guide: 1024x1024 high = 765; 2048x4096 high = 1105; any size low = 85.
    assert image_tokens(1024, 1024, "high") == 765
    assert image_tokens(2048, 4096, "high") == 1105
    assert image_tokens(4096, 8192, "low") == 85
    assert image_tokens(768, 512, "auto") == 85 + 170 * 2
    assert image_tokens(1024, 1024, "high", model="gpt-4o-mini-2024-07-18") == 2833 + 5667 * 4


def _data_url(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(buffer, format="JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_count_request_reads_image_sizes_from_the_data_urls() -> None:
    messages = [
        {"role": "system", "content": "hello world"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hello world"},
                {"type": "image_url", "image_url": {"url": _data_url(1024, 1024), "detail": "high"}},
                {"type": "image_url", "image_url": {"url": _data_url(300, 200), "detail": "low"}},
            ],
        },
    ]
    tokens = count_request("gpt-4o", messages)
    assert tokens.images == 765 + 85 and tokens.images_exact
    # 3 reply priming + per message 3 framing + role + text: "system", "user" one token each and "hello
    # world" two in o200k_base (ids 24912, 2375, as tiktoken's README shows)
    assert tokens.text == 3 + (3 + 1 + 2) + (3 + 1 + 2) and tokens.text_exact
    other = count_request("Qwen/Qwen2-VL-2B-Instruct", messages)
    assert not other.images_exact and not other.text_exact
    assert other.text == 3 + (3 + 2 + 3) + (3 + 1 + 3)  # an estimate: 4 characters a token, rounded up


def test_image_sizes_are_read_from_the_header_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every request with an image is counted before it is sent: only the start of a large payload is
    decoded, unless its header runs past it (a long ICC profile), when the whole is."""
    from finer.models import tokens

    decoded: list[int] = []
    real_decode = base64.b64decode
    monkeypatch.setattr(
        tokens.base64, "b64decode", lambda data, **kw: decoded.append(len(data)) or real_decode(data, **kw)
    )
    noise = Image.effect_noise((768, 512), 64).convert("RGB")
    plain, profiled = io.BytesIO(), io.BytesIO()
    noise.save(plain, format="JPEG")
    noise.save(profiled, format="JPEG", icc_profile=b"\0" * 8000)
    for data in (plain, profiled):
        decoded.clear()
        url = "data:image/jpeg;base64," + base64.b64encode(data.getvalue()).decode()
        assert len(url) > 100_000
        assert tokens.image_size(url) == (768, 512)
        assert decoded[0] <= 4096
    assert decoded[-1] > 100_000  # the profiled one: decoded whole


def test_the_bundled_rank_files_are_the_ones_tiktoken_checks() -> None:
    """Exact counts offline rest on bpe-openai shipping OpenAI's rank files unchanged: their sha256 must be
    the one tiktoken itself checks a download against."""
    import gzip
    import hashlib
    import importlib.resources
    import inspect
    import re

    import tiktoken_ext.openai_public as public

    for name in ("o200k_base", "cl100k_base"):
        expected = re.search(r'expected_hash="([0-9a-f]{64})"', inspect.getsource(getattr(public, name)))
        packed = importlib.resources.files("bpe_openai.data").joinpath(f"{name}.tiktoken.gz").read_bytes()
        assert hashlib.sha256(gzip.decompress(packed)).hexdigest() == expected.group(1), name
    assert encoding("o200k_base").encode("hello world") == [24912, 2375]
    assert encoding("cl100k_base").encode("hello world") == [15339, 1917]


def test_rate_limiter_paces_requests_and_holds_every_window() -> None:
    now = [0.0]
    limiter = RateLimiter(rpm=120, clock=lambda: now[0])
    starts = []

    async def run() -> None:
        real_sleep = asyncio.sleep

        async def fake_sleep(seconds: float) -> None:
            now[0] += seconds
            await real_sleep(0)

        asyncio.sleep = fake_sleep  # type: ignore[assignment]
        try:
            for _ in range(300):
                await limiter.acquire()
                starts.append(now[0])
        finally:
            asyncio.sleep = real_sleep  # type: ignore[assignment]

    asyncio.run(run())
    gaps = {round(b - a, 6) for a, b in zip(starts, starts[1:], strict=False)}
    assert gaps <= {0.5, 1.5}  # paced; at a window's end the guard holds one back a second more
    assert (starts[-1] - starts[0]) / (len(starts) - 1) == pytest.approx(0.5, rel=0.02)
    for i, t in enumerate(starts):
        assert sum(t <= s < t + 60 for s in starts[i:]) <= 120


def test_token_limit_holds_the_window_and_lets_a_lone_oversize_request_go() -> None:
    now = [0.0]
    limiter = RateLimiter(tpm=1000, clock=lambda: now[0])
    assert limiter._tokens.wait(600, 0.0) <= 0
    limiter._tokens.take(600, 0.0)
    assert limiter._tokens.wait(600, 1.0) == pytest.approx(60.0)  # pace 36 s, window (and guard) to 61
    assert limiter._tokens.wait(5000, 61.0) <= 0  # alone in its window: it goes


def test_pause_holds_every_request_and_overlapping_pauses_merge() -> None:
    now = [10.0]
    seen = []
    limiter = RateLimiter(clock=lambda: now[0], on_pause=seen.append)
    limiter.pause(2.0)
    limiter.pause(1.0)  # inside the first: nothing new
    assert limiter.paused == pytest.approx(2.0) and seen == [2.0] and limiter.pauses == 1
    now[0] = 13.0
    assert limiter.paused == 0


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"Retry-After": "3"}, 3.0),
        ({"retry-after-ms": "250"}, 0.25),
        ({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"}, 360.0),
        ({"x-ratelimit-reset-tokens": "20ms"}, 0.02),
        ({"x-ratelimit-reset-requests": "1h2m3.5s"}, 3723.5),
        ({}, 1.0),
    ],
)
def test_pause_seconds_reads_the_headers_openai_sends(headers: dict[str, str], seconds: float) -> None:
    assert pause_seconds(headers) == pytest.approx(seconds)


def test_budget_holds_calls_in_flight_and_stops_for_good() -> None:
    budget = Budget(1.0)
    assert budget.reserve(0.4) and budget.reserve(0.4)
    assert not budget.reserve(0.4)  # 0.8 held + 0.4 > 1.0
    budget.settle(0.4, 0.1)
    assert not budget.reserve(0.1)  # once refused, no call starts again
    assert "--max-cost 1 USD" in budget.message()


def test_projection_uses_cached_replies_mean_then_max_tokens() -> None:
    from finer.models.tokens import TokenCount

    projection = Projection()
    for _ in range(3):
        projection.add("abc", "gpt-4o-mini", TokenCount(text=100, images=85, text_exact=False), 50)
    projected = projection.to_json(PriceTable())
    step = projected["steps"]["template abc @ gpt-4o-mini"]
    assert step["output_tokens"] == 150 and "max_tokens" in step["output_tokens_from"]
    assert step["text_tokens_counted"].startswith("estimate")
    assert projected["usd"] == pytest.approx((555 * 0.15 + 150 * 0.60) / 1e6, abs=1e-6)
    projection.add_cached("abc", "gpt-4o-mini", 10)
    projection.add_cached("abc", "gpt-4o-mini", 20)
    step = projection.to_json(PriceTable())["steps"]["template abc @ gpt-4o-mini"]
    assert step["output_tokens"] == 45 and step["cached_calls"] == 2
    projection.add("abc", "local-model", TokenCount(text=1), None)
    assert projection.to_json(PriceTable())["usd"] == "unknown"


def test_split_urls() -> None:
    assert split_urls("http://a/v1, http://b/v1,http://a/v1") == ["http://a/v1", "http://b/v1"]
    assert split_urls(None) == [None]


def test_pool_spreads_takes_out_and_puts_back() -> None:
    now = [0.0]
    a, b = Endpoint("a", None, capacity=2), Endpoint("b", None, capacity=2)
    pool = EndpointPool([a, b], clock=lambda: now[0])

    async def run() -> None:
        first = [await pool.acquire() for _ in range(4)]
        assert sorted(e.url for e in first) == ["a", "a", "b", "b"]
        for endpoint in first:
            await pool.release(endpoint, answered=endpoint is not a)
        assert not a.healthy and b.healthy and not pool.all_down()
        assert {(await pool.acquire()).url for _ in range(2)} == {"b"}  # a is out
        now[0] = 5.0  # a's cooldown passed: the next request probes it
        probe = await pool.acquire()
        assert probe is a
        await pool.release(a, answered=False)  # still down: out again, for twice as long
        assert a.down_until == 15.0
        now[0] = 15.0
        probe = await pool.acquire()
        await pool.release(probe, answered=True)
        assert probe is a and a.healthy

    asyncio.run(run())
    assert pool.calls() == {"a": 1, "b": 2}


def test_a_freed_slot_wakes_one_waiter_not_all() -> None:
    """Many workers may wait for a slot (ground runs two per slot): each release wakes one of them, not
    every one to find the slot taken again."""
    pool = EndpointPool([Endpoint("a", None, capacity=1)])
    picks = []
    real_pick = pool._pick
    pool._pick = lambda now: picks.append(now) or real_pick(now)  # type: ignore[method-assign]

    async def run() -> None:
        async def call() -> None:
            endpoint = await pool.acquire()
            await asyncio.sleep(0)
            await pool.release(endpoint, answered=True)

        await asyncio.gather(*(call() for _ in range(20)))

    asyncio.run(run())
    assert pool.calls() == {"a": 20}
    assert len(picks) <= 2 * 20, f"{len(picks)} looks for a slot for 20 calls"


def test_a_slot_refused_or_cancelled_goes_to_the_next_waiter() -> None:
    """`admit` (the budget) refusing the slot a waiter was woken for, or the waiter being cancelled, hands
    the slot to the next waiter rather than leaving it free while others wait."""
    pool = EndpointPool([Endpoint("a", None, capacity=1)])

    def refuse() -> None:
        raise RuntimeError("over budget")

    async def run() -> None:
        holder = await pool.acquire()
        refused = asyncio.create_task(pool.acquire(admit=refuse))
        waiting = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0.01)
        await pool.release(holder, answered=True)  # wakes `refused`, which is refused
        with pytest.raises(RuntimeError):
            await refused
        holder = await asyncio.wait_for(waiting, timeout=1)

        cancelled = asyncio.create_task(pool.acquire())
        waiting = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0.01)
        await pool.release(holder, answered=True)  # wakes `cancelled`...
        cancelled.cancel()  # ...which is cancelled before it can take the slot
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert (await asyncio.wait_for(waiting, timeout=1)).in_flight == 1

    asyncio.run(run())
