"""Several OpenAI-compatible endpoints serving one model (`--base-url a,b` or `--base-url a --base-url b`):
data-parallel vLLM / SGLang / TGI replicas, each with its own concurrency.

A request goes to the endpoint with the fewest calls in flight (relative to its concurrency). An endpoint
that does not answer after the client's retries (connection refused, timed out) is taken out of
rotation and the request goes to another; after a cooldown (doubling to a minute while it stays down)
one request probes it again, and an answer puts it back. Only when every endpoint is out does the run
stop. Calls are counted per endpoint for the run's summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

__all__ = ["Endpoint", "EndpointPool", "split_urls"]

COOLDOWN_S = 5.0
MAX_COOLDOWN_S = 60.0


def split_urls(base_url: str | None) -> list[str | None]:
    """The endpoints of `--base-url` (a comma list; repeated options arrive joined by commas)."""
    urls = [url.strip() for url in (base_url or "").split(",") if url.strip()]
    return list(dict.fromkeys(urls)) or [None]


@dataclass
class Endpoint:
    """One endpoint's client (anything; `ChatClient` puts an `openai.AsyncOpenAI` here) and its state."""

    url: str
    client: Any
    capacity: int
    in_flight: int = 0
    calls: int = 0
    healthy: bool = True
    down_until: float = 0.0
    cooldown: float = COOLDOWN_S


class EndpointPool:
    """Hands out endpoints with a free slot: `endpoint = await pool.acquire()`, then `pool.release(...)`."""

    def __init__(self, endpoints: list[Endpoint], *, clock: Callable[[], float] = time.monotonic) -> None:
        self.endpoints = endpoints
        self._clock = clock
        self._changed = asyncio.Condition()

    @property
    def capacity(self) -> int:
        """Calls the pool takes at once: the sum of the endpoints' concurrencies."""
        return sum(endpoint.capacity for endpoint in self.endpoints)

    def _pick(self, now: float) -> Endpoint | None:
        """An endpoint out of rotation that is due for its probe, else the least busy one in rotation."""
        due = [e for e in self.endpoints if not e.healthy and e.down_until <= now and not e.in_flight]
        if due:
            return due[0]
        ready = [e for e in self.endpoints if e.healthy and e.in_flight < e.capacity]
        return min(ready, key=lambda e: (e.in_flight / e.capacity, e.calls)) if ready else None

    async def acquire(self, admit: Callable[[], None] | None = None) -> Endpoint:
        """Wait for a free slot (or a probe due) and take it. `admit` runs once a slot is found, before it
        is taken: what it raises (the budget refusing the call) leaves the slot free."""
        async with self._changed:
            try:
                while True:
                    now = self._clock()
                    endpoint = self._pick(now)
                    if endpoint is not None:
                        if admit is not None:
                            admit()
                        endpoint.in_flight += 1
                        return endpoint
                    probes = [e.down_until - now for e in self.endpoints if not e.healthy and not e.in_flight]
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            self._changed.wait(), timeout=max(0.01, min(probes)) if probes else None
                        )
            except BaseException:  # cancelled, or refused by `admit`
                self._changed.notify(1)  # a freed slot this waiter was woken for goes to the next
                raise

    async def release(self, endpoint: Endpoint, *, answered: bool) -> None:
        """Free the slot. `answered`: the endpoint replied (any HTTP status) and is in rotation; else it is
        taken out until its next probe."""
        async with self._changed:
            endpoint.in_flight -= 1
            if answered:
                endpoint.calls += 1
                if endpoint.healthy:  # one slot freed: one waiter, not all (a run may keep many waiting)
                    self._changed.notify(1)
                    return
                endpoint.healthy = True
                tqdm.write(f"endpoint {endpoint.url} answers again: back in rotation")
            elif len(self.endpoints) > 1:
                now = self._clock()
                if endpoint.healthy:
                    tqdm.write(
                        f"endpoint {endpoint.url} does not answer: out of rotation, probed again later"
                    )
                    endpoint.cooldown = COOLDOWN_S
                elif now < endpoint.down_until:  # a call sent before it went out: nothing new
                    self._changed.notify_all()
                    return
                else:  # its probe failed
                    endpoint.cooldown = min(2 * endpoint.cooldown, MAX_COOLDOWN_S)
                endpoint.healthy = False
                endpoint.down_until = now + endpoint.cooldown
            self._changed.notify_all()

    def all_down(self) -> bool:
        """Whether no endpoint is in rotation (the run cannot go on)."""
        return not any(endpoint.healthy for endpoint in self.endpoints)

    def calls(self) -> dict[str, int]:
        """Calls answered per endpoint."""
        return {endpoint.url: endpoint.calls for endpoint in self.endpoints}
