"""What the throughput benchmarks share: the fake OpenAI-compatible endpoint, run in a process of its own."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# It prints its URL, serves until stdin closes, then prints its peak load.
_SERVE = """
import sys
from finer.testing.fake_openai import FakeOpenAI

{answer}

with FakeOpenAI(answer, delay=float(sys.argv[1])) as server:
    print(server.url, flush=True)
    sys.stdin.read()
print(server.max_in_flight, flush=True)
"""


@dataclass
class Endpoint:
    url: str
    #: The most requests it had in flight at once; known once the `with` block is left.
    peak: int | None = None


@contextmanager
def fake_endpoint(answer: str, delay_s: float) -> Iterator[Endpoint]:
    """`finer.testing.fake_openai.FakeOpenAI` in its own process, as a real endpoint would be: its JSON and
    HTTP work must not take the client's interpreter lock. `answer` is the Python source of a function
    ``answer(request)`` giving each reply; every reply comes after `delay_s` seconds."""
    script = _SERVE.replace("{answer}", textwrap.dedent(answer).strip())
    server = subprocess.Popen(
        [sys.executable, "-c", script, str(delay_s)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    endpoint = Endpoint(server.stdout.readline().strip())  # type: ignore[union-attr]
    if not endpoint.url.startswith("http://"):
        server.kill()
        server.wait()
        raise SystemExit("the fake server did not start")
    try:
        yield endpoint
    finally:
        peak, _ = server.communicate("")
        endpoint.peak = int(peak) if peak.strip().isdigit() else None
