"""What the throughput benchmarks share: the fake OpenAI-compatible endpoint, run in a process of its own."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

# It prints its URL, answers each line on stdin with the CPU seconds it used so far, serves until stdin
# closes, then prints its peak load.
_SERVE = """
import sys
import time
from finer.testing.fake_openai import FakeOpenAI

{answer}

with FakeOpenAI(answer, delay=float(sys.argv[1])) as server:
    print(server.url, flush=True)
    for _ in sys.stdin:
        print(time.process_time(), flush=True)
print(server.max_in_flight, flush=True)
"""


@dataclass
class Endpoint:
    url: str
    server: subprocess.Popen[str] = field(repr=False)
    #: The most requests it had in flight at once; known once the `with` block is left.
    peak: int | None = None

    def cpu_s(self) -> float:
        """CPU seconds the server process used so far (all its threads): what it costs the machine."""
        self.server.stdin.write("\n")  # type: ignore[union-attr]
        self.server.stdin.flush()  # type: ignore[union-attr]
        return float(self.server.stdout.readline())  # type: ignore[union-attr]


@contextmanager
def fake_endpoint(answer: str, delay_s: float) -> Iterator[Endpoint]:
    """`finer.testing.fake_openai.FakeOpenAI` in its own process, as a real endpoint would be: its JSON and
    HTTP work must not take the client's interpreter lock. `answer` is the Python source of a function
    ``answer(request)`` giving each reply; every reply comes after `delay_s` seconds."""
    script = _SERVE.replace("{answer}", textwrap.dedent(answer).strip())
    server = subprocess.Popen(
        [sys.executable, "-c", script, str(delay_s)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    endpoint = Endpoint(server.stdout.readline().strip(), server)  # type: ignore[union-attr]
    if not endpoint.url.startswith("http://"):
        server.kill()
        server.wait()
        raise SystemExit("the fake server did not start")
    try:
        yield endpoint
    finally:
        peak, _ = server.communicate("")
        endpoint.peak = int(peak) if peak.strip().isdigit() else None
