"""One rate limiter for a whole run (`--rpm`, `--tpm`), shared by every worker and every client of it.

Each request waits its turn before it is sent (its retries too: the server counts them). Requests and
tokens are each paced evenly (one request every 60/rpm s; a request of n tokens holds the next back by
n * 60/tpm s; sends that came late may catch up half a second's worth) and also kept under the limit in
every sliding 60-s window, so a run never exceeds the account's limits in any minute. A 429 pauses the
whole run for what the server asks (`Retry-After`, `retry-after-ms`, or OpenAI's
`x-ratelimit-reset-requests` / `-tokens`), not only the request that got it. The limiter's state sits
behind a thread lock and it sleeps with `asyncio.sleep`, so the clients of one run share it even across
the event loops of its steps.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime

__all__ = ["RateLimiter", "pause_seconds"]

WINDOW_S = 60.0
#: The window is held over this much longer than a minute: a request reaches the server a little after it
#: leaves the limiter, and that jitter must not put one request too many into the server's minute.
WINDOW_GUARD_S = 1.0
#: Capacity a limit may catch up when sends came late (a busy event loop wakes its waiters late): half a
#: second's worth, or one unit. Without it the late wake-ups are lost and a run falls well below --rpm.
CATCH_UP_S = 0.5
#: The pause after a 429 that names no wait: the `openai` client's own first backoff.
DEFAULT_PAUSE_S = 1.0
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+)ms)?")


class _Window:
    """A per-minute limit on some amount (requests, tokens): paced evenly and held in every 60-s window."""

    def __init__(self, per_minute: float) -> None:
        self.limit = per_minute
        self.interval = WINDOW_S / per_minute
        self.catch_up = max(CATCH_UP_S, self.interval)
        self.next_at: float | None = None  # set by the first take: a run starts without a burst
        self.log: deque[tuple[float, float]] = deque()
        self.total = 0.0

    def wait(self, amount: float, now: float) -> float:
        """Seconds until `amount` may start: its pace, and room in the window (a lone oversize one goes)."""
        span = WINDOW_S + WINDOW_GUARD_S
        while self.log and self.log[0][0] <= now - span:
            self.total -= self.log.popleft()[1]
        wait = -1.0 if self.next_at is None else self.next_at - now
        excess = self.total + amount - self.limit
        for at, taken in self.log:
            if excess <= 0:
                break
            excess -= taken
            wait = max(wait, at + span - now)
        return wait

    def take(self, amount: float, now: float) -> None:
        start = now if self.next_at is None else max(self.next_at, now - self.catch_up)
        self.next_at = start + amount * self.interval
        self.log.append((now, amount))
        self.total += amount


class RateLimiter:
    """`await acquire(tokens)` before each request; `pause(seconds)` after a 429 holds every request."""

    def __init__(
        self,
        rpm: float | None = None,
        tpm: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_pause: Callable[[float], None] | None = None,
    ) -> None:
        self.rpm, self.tpm = rpm, tpm
        self._requests = _Window(rpm) if rpm else None
        self._tokens = _Window(tpm) if tpm else None
        self._clock = clock
        self._lock = threading.Lock()
        self._paused_until = 0.0
        self._on_pause = on_pause
        #: Run-wide pauses after 429s and the seconds they held the run.
        self.pauses = 0
        self.paused_s = 0.0

    async def acquire(self, tokens: int = 0) -> None:
        """Wait until a request of `tokens` (input plus expected output) may be sent, and count it."""
        while True:
            with self._lock:
                now = self._clock()
                wait = self._paused_until - now
                if self._requests:
                    wait = max(wait, self._requests.wait(1, now))
                if self._tokens:
                    wait = max(wait, self._tokens.wait(tokens, now))
                if wait <= 0:
                    if self._requests:
                        self._requests.take(1, now)
                    if self._tokens:
                        self._tokens.take(tokens, now)
                    return
            await asyncio.sleep(wait)

    def pause(self, seconds: float) -> None:
        """Hold every request of the run for `seconds` from now (a 429's wait); overlapping pauses merge."""
        with self._lock:
            now = self._clock()
            until = now + seconds
            if until <= self._paused_until:
                return
            self.paused_s += until - max(now, self._paused_until)
            fresh = self._paused_until <= now
            self._paused_until = until
            self.pauses += fresh
        if fresh and self._on_pause is not None:
            self._on_pause(seconds)

    @property
    def paused(self) -> float:
        """Seconds the run still pauses (0 when it runs)."""
        return max(0.0, self._paused_until - self._clock())


def pause_seconds(headers: Mapping[str, str], now: float | None = None) -> float:
    """How long a 429's headers ask to wait: `retry-after-ms`, `retry-after` (seconds or a date), else the
    longest of OpenAI's `x-ratelimit-reset-*` ("1s", "6m0s", "20ms"); DEFAULT_PAUSE_S when none says."""
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        if "retry-after-ms" in lower:
            return max(0.0, float(lower["retry-after-ms"]) / 1000)
        if "retry-after" in lower:
            value = lower["retry-after"]
            try:
                return max(0.0, float(value))
            except ValueError:
                date = parsedate_to_datetime(value)
                return max(0.0, date.timestamp() - (time.time() if now is None else now))
    except (TypeError, ValueError):
        pass
    resets = [_duration(v) for k, v in lower.items() if k.startswith("x-ratelimit-reset-")]
    resets = [r for r in resets if r is not None]
    return max(resets) if resets else DEFAULT_PAUSE_S


def _duration(text: str) -> float | None:
    """Seconds in an OpenAI reset duration ("1s", "6m0s", "1h2m3.5s", "20ms"); None if it is none."""
    match = _DURATION.fullmatch(text.strip())
    if not text.strip() or match is None:
        return None
    hours, minutes, seconds, millis = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds + millis / 1000
