"""A small shared layer over the `openai` client for every step that calls an LLM or VLM endpoint.

Attribute extraction, coarse labelling, evaluation and grounding all need the same things: a client built
from `--base-url` / `OPENAI_BASE_URL` / `OPENAI_API_KEY` (any OpenAI-compatible server), a bound on
concurrent calls, replies cached by content so re-runs and resumed runs make no repeated calls, JSON-schema
structured output where the server has it, and token/cost accounting for build.json.

Retries are the `openai` client's own: it retries timeouts, connection errors, 408, 409, 429 and 5xx with
exponential backoff and jitter, and waits what `Retry-After` / `retry-after-ms` say (a server asking for
more than 120 s gets no retry). We only set `max_retries` and `timeout`, and decide what a failure that
survives them means for the run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import os
import re
from collections.abc import Callable, Coroutine, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

import openai
from openai.types.chat import ChatCompletion

from finer.cache import Cache, cache_key
from finer.errors import FinerError
from finer.models.client_config import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_RETRIES,
    DEFAULT_MODEL,
    DEFAULT_TIMEOUT_S,
    endpoint_configured,
)
from finer.models.endpoints import Endpoint, EndpointPool, split_urls
from finer.models.policy import DEFAULT_OUTPUT_TOKENS, Budget, RunPolicy, active_policy
from finer.models.ratelimit import pause_seconds
from finer.models.tokens import count_request
from finer.prompts import to_openai

__all__ = [
    "CACHE_NAMESPACE",
    "Chat",
    "MalformedJSON",
    "Reply",
    "DEFAULT_MODEL",
    "OPTIONAL_PARAMETERS",
    "DryRun",
    "OverBudget",
    "CallFailed",
    "ChatClient",
    "EndpointError",
    "Usage",
    "endpoint_configured",
    "estimate_cost",
    "ask_parsed",
    "openai_messages",
    "parse_json_object",
    "repair_request",
    "run_sync",
    "run_workers",
    "workers_for",
]

CACHE_NAMESPACE = "llm"
#: `max_tokens` of a repair turn after a reply cut at the endpoint's own limit (none was sent).
REPAIR_MAX_TOKENS = 4096
#: Stands in for a key at endpoints that need none (a local vLLM or Ollama); the client insists on one.
NO_KEY = "no-key"

#: Request parameters an endpoint may not support, and the words its 400 uses to say so: JSON-schema
#: structured output (older vLLM, Ollama, most proxies), temperature (reasoning models), and max_tokens
#: (OpenAI's reasoning models take `max_completion_tokens` instead, which is then sent). A 400 that merely
#: names max_tokens ("too large for the context") is a failed call, not a refusal.
OPTIONAL_PARAMETERS: dict[str, tuple[str, ...]] = {
    "response_format": ("response_format", "json_schema"),
    "temperature": ("temperature",),
    "max_tokens": (
        "Unsupported parameter: 'max_tokens'",
        "Unrecognized request argument supplied: max_tokens",
    ),
    "max_completion_tokens": (
        "Unsupported parameter: 'max_completion_tokens'",
        "Unrecognized request argument supplied: max_completion_tokens",
    ),
}
#: The request options `chat.completions.create` passes (the API key as a bearer token, no admin key).
_CHAT_OPTIONS: Any = {"security": {"bearer_auth": True}}
_SECRETISH = re.compile(r"\b(sk-[A-Za-z0-9_-]{2})[A-Za-z0-9_-]+|(Bearer\s+)\S+")

T = TypeVar("T")
#: Tokens the current task's request is expected to use (input and output), for `--tpm`.
_EXPECTED: ContextVar[int] = ContextVar("finer_expected_tokens", default=0)
#: Tries of the call the current task is making (`ChatClient._call` sets it, the httpx hook counts).
_TRIES: ContextVar[list[int]] = ContextVar("finer_tries")


class EndpointError(FinerError):
    """The endpoint refuses every call (bad key, unknown model, unreachable URL): the run stops."""


class CallFailed(Exception):
    """One call failed after the client's retries; the caller records it and goes on with the rest."""


class DryRun(CallFailed):
    """`--dry-run`: the call was counted, not sent; the step goes on as if it had failed."""


class OverBudget(CallFailed):
    """`--max-cost`: the call was not started, its projected cost would pass the budget."""


# A 400 that names images: the model or server takes no image input (OpenAI, vLLM and Ollama say so).
_REFUSES_IMAGES = re.compile(r"HTTP 400.*\b(image|images|image_url|multimodal|multi-modal|vision)\b", re.I)


class ImagesRefused(FinerError):
    """The endpoint answers text but refuses images: no call that carries one can succeed."""


def refuses_images(err: CallFailed) -> bool:
    """Whether a failed call was refused because it carried an image (a text-only model)."""
    return bool(_REFUSES_IMAGES.search(str(err)))


def estimate_cost(model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
    """USD for one call at the run's prices (`finer.models.pricing`: built-in, dated, or `--prices`), or
    None when the model (or its dated snapshot) has no price: never guessed."""
    return active_policy().prices.cost(model, prompt_tokens, completion_tokens)


@dataclass
class Usage:
    """What a run spent: calls answered by the endpoint, replies served from cache, tokens, USD.

    `failed_calls` failed after every retry; `retries` counts the tries beyond each call's first (timeouts,
    rate limits, 5xx). `estimated_cost_usd` becomes None ("unknown") once any call went to a model
    without a known price.
    """

    calls: int = 0
    cache_hits: int = 0
    failed_calls: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated_cost_usd: float | None = 0.0
    #: Calls answered per endpoint, shown when a run spreads over several (`--base-url a,b`).
    endpoints: dict[str, int] = field(default_factory=dict)

    def record(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.calls += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        cost = estimate_cost(model, prompt_tokens, completion_tokens)
        if cost is None or self.estimated_cost_usd is None:
            self.estimated_cost_usd = None
        else:
            self.estimated_cost_usd += cost

    def usage_json(self) -> dict[str, Any]:
        cost = self.estimated_cost_usd
        return {
            "calls": self.calls,
            "cache_hits": self.cache_hits,
            "failed_calls": self.failed_calls,
            "retries": self.retries,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "estimated_cost_usd": "unknown" if cost is None else round(cost, 6),
            **({"calls_per_endpoint": dict(self.endpoints)} if len(self.endpoints) > 1 else {}),
        }


def public_url(url: str) -> str:
    """The URL without user info or query, which may carry credentials: what keys and messages show."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def _redact(text: str, secret: str) -> str:
    """`text` with the API key, and anything shaped like a key or bearer token, masked."""
    if secret and secret != NO_KEY:
        text = text.replace(secret, "***")
    return _SECRETISH.sub(lambda m: f"{m.group(1)}***" if m.group(1) else f"{m.group(2)}***", text)


def openai_messages(messages: Sequence[dict], images: Sequence[str] = ()) -> list[dict]:
    """Rendered template messages in the chat-completions wire shape.

    Image slots become `image_url` blocks (data URLs, `finer.prompts.to_openai`); a message of text
    blocks only becomes one string, which every OpenAI-compatible server accepts for every role.
    """
    converted = to_openai(messages, images)
    for message in converted:
        blocks = message["content"]
        if all(block.get("type") == "text" for block in blocks):
            message["content"] = "\n\n".join(block["text"] for block in blocks)
    return converted


class MalformedJSON(ValueError):
    """A reply starts a JSON value that does not parse whole: cut off, or broken. Never an answer."""


_FENCE_OPEN = re.compile(r"```[\w-]*[ \t]*\n?")
#: Where a JSON object (or an array of objects) starts; "{note}" or "[visible]" in prose does not count.
_JSON_START = re.compile(r'\{\s*["}]')
_JSON_OR_ARRAY_START = re.compile(r'\{\s*["}]|\[\s*[{\]]')


def parse_json_object(text: str, *, arrays: bool = False) -> dict[str, Any] | list[Any] | None:
    """The JSON object a reply holds, parsed whole: bare, inside a markdown fence, or after some prose.

    None when the reply holds no JSON at all (the caller may read another form). Raises `MalformedJSON`
    when a fence is left open or the first object (or, with `arrays`, array) does not parse to its end:
    a partial list must never pass for an answer, nor an object nested inside the cut one.
    """
    fence = _FENCE_OPEN.search(text)
    if fence is not None and not _JSON_START.search(text, 0, fence.start()):
        end = text.find("```", fence.end())
        if end < 0:
            raise MalformedJSON("a markdown fence is never closed")
        text = text[fence.end() : end]
    start = (_JSON_OR_ARRAY_START if arrays else _JSON_START).search(text)
    if start is None:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text, start.start())
    except json.JSONDecodeError as err:
        raise MalformedJSON(f"JSON that does not parse whole ({err.msg})") from None
    if isinstance(value, dict) or (isinstance(value, list) and arrays):
        return value
    raise MalformedJSON("JSON that is not an object")


def _is_reply_entry(entry: Any) -> bool:
    """A cached reply of this finer's shape (another version's is a miss, never a crash)."""
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("text"), str)
        and isinstance(entry.get("finish_reason"), str)
    )


async def run_workers(worker: Callable[[], Coroutine[Any, Any, None]], count: int) -> None:
    """Run `count` copies of `worker` until all return. One worker's fatal `FinerError` (endpoint down,
    images refused) stops them all and is raised alone, as the one line it is, not in an ExceptionGroup."""
    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(count):
                group.create_task(worker())
    except ExceptionGroup as errors:
        fatal = next((e for e in errors.exceptions if isinstance(e, FinerError)), None)
        if fatal is None:
            raise
        raise fatal from None


#: Workers per endpoint slot: while one worker prepares its next request (reads and encodes an image) or
#: writes its result, the slot it left serves another worker that is ready, so the endpoints stay busy.
#: The slots (`EndpointPool`) still hold the calls in flight to --concurrency per endpoint.
WORKERS_PER_SLOT = 2


def workers_for(chat: object, pending: int | None = None, *, batch: int) -> int:
    """How many workers keep `chat` busy: `WORKERS_PER_SLOT` per slot of its endpoints (`capacity`), or
    `batch` for a local model (`HFChat`, which answers `batch` requests at a time); never more than the
    `pending` items there are to ask about."""
    slots = getattr(chat, "capacity", None)
    workers = WORKERS_PER_SLOT * slots if slots else batch
    return workers if pending is None else min(workers, pending)


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from synchronous code, also where an event loop already runs (a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


@dataclass(frozen=True)
class Reply:
    """A reply's text and why it ended: "length" when the endpoint cut it at its token limit."""

    text: str
    finish_reason: str = "stop"

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


class Chat(Protocol):
    """What the steps need of a chat model: `ChatClient` (an endpoint) or `finer.models.vlm.HFChat`."""

    model: str
    base_url: str

    async def reply(
        self,
        messages: list[dict],
        *,
        template_sha256: str,
        schema: dict[str, Any] | None = None,
        max_tokens: int | None = None,
    ) -> Reply: ...


def repair_request(form: str, *, cut: bool) -> str:
    """The one repair turn's request (part of the repair call, so of its cache key)."""
    why = "was cut off before it ended" if cut else "was not in the requested form"
    return f"Your reply {why}. Reply again with one complete JSON object and nothing else: {form}"


async def ask_parsed(
    chat: Chat,
    messages: list[dict],
    parse: Callable[[str], T | None],
    *,
    form: str,
    template_sha256: str,
    schema: dict[str, Any] | None = None,
    max_tokens: int | None = None,
) -> T | None:
    """`parse` of the reply to `messages`, or None when neither it nor one repair turn is a whole answer.

    A reply cut at the token limit (finish reason "length") or one `parse` rejects (None or
    `MalformedJSON`) is not an answer: the model sees it and `repair_request(form)`, with twice the
    tokens (or `REPAIR_MAX_TOKENS`) when it was cut. Every JSON-mode call of finer goes through here.
    Raises what `chat.reply` raises (`CallFailed` and the run-stopping errors).
    """
    first = await chat.reply(messages, template_sha256=template_sha256, schema=schema, max_tokens=max_tokens)
    parsed = _parsed(first, parse)
    if parsed is not None:
        return parsed
    repair = [
        *messages,
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": repair_request(form, cut=first.truncated)},
    ]
    if first.truncated:
        max_tokens = 2 * max_tokens if max_tokens else REPAIR_MAX_TOKENS
    again = await chat.reply(repair, template_sha256=template_sha256, schema=schema, max_tokens=max_tokens)
    return _parsed(again, parse)


def _parsed(reply: Reply, parse: Callable[[str], T | None]) -> T | None:
    if reply.truncated:
        return None
    try:
        return parse(reply.text)
    except MalformedJSON:
        return None


class _Hold:
    """A call's projected cost, held in the run's budget (`--max-cost`) from when the call gets an
    endpoint slot until it ends. A call still waiting for a slot holds nothing, so workers waiting
    their turn do not stop a run short of its budget."""

    def __init__(self, budget: Budget | None, cost: float | None) -> None:
        self.budget = budget
        self.cost = cost or 0.0
        self.held = False

    def take(self) -> None:
        """Hold the cost, once per call (a retry or failover holds it already); raises `OverBudget`."""
        if self.budget is None or self.held:
            return
        if not self.budget.reserve(self.cost):
            raise OverBudget(f"not started: --max-cost {self.budget.max_cost:g} USD reached")
        self.held = True

    def settle(self, spent: float) -> None:
        """The call ended: release what it held and count what it cost."""
        if self.budget is not None and self.held:
            self.budget.settle(self.cost, spent)


class _Unanswered(Exception):
    """An endpoint sent no answer after its retries; `error` is what the run raises if no other is left."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class ChatClient:
    """One model at one endpoint for one run: `async with ChatClient(...) as chat: await chat.complete(...)`.

    Every reply is cached (namespace "llm") the moment it arrives, keyed by endpoint URL, model, template
    hash and request, never the API key; a cached reply costs no call. At most `concurrency` calls are in
    flight at each endpoint (`base_url` may list several replicas, comma-separated: the first one's URL
    keys the cache, `finer.models.endpoints` spreads the calls). The run's `RunPolicy` (made active by the
    CLI) prices calls, projects them instead under `--dry-run`, holds `--max-cost`, and paces every try
    through its shared rate limiter, which a 429 pauses for the whole run. When the endpoint rejects
    JSON-schema `response_format` (or `temperature`) with a 400, the client remembers it for the rest of
    the run and sends requests without it; callers parse either kind of reply.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        *,
        cache: Cache,
        usage: Usage | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        temperature: float | None = 0.0,
    ) -> None:
        if concurrency < 1:
            raise FinerError("--concurrency must be at least 1")
        url = base_url or os.environ.get("OPENAI_BASE_URL")
        self._key = os.environ.get("OPENAI_API_KEY") or ""
        if not url and not self._key:
            raise EndpointError(
                "no LLM endpoint configured: set OPENAI_API_KEY (and OPENAI_BASE_URL) or pass --base-url, "
                "or choose an offline extractor (--extractor rules)"
            )
        self.model = model
        self.cache = cache
        self.usage = usage if usage is not None else Usage()
        self.temperature = temperature
        #: Optional request parameters this endpoint refused (see OPTIONAL_PARAMETERS), for the whole run.
        self.refused: set[str] = set()
        self._schema_accepted = False
        if timeout <= 0 or max_retries < 0:
            raise FinerError("--timeout must be above 0 seconds and --max-retries at least 0")
        self.timeout, self.max_retries = timeout, max_retries
        self.policy: RunPolicy = active_policy()
        self.policy.check_model(model)
        hooks = {"request": [self._before_try], "response": [self._after_try]}
        clients = [
            openai.AsyncOpenAI(
                api_key=self._key or NO_KEY,
                base_url=each,
                timeout=timeout,
                max_retries=max_retries,
                http_client=openai.DefaultAsyncHttpxClient(event_hooks=hooks),
            )
            for each in split_urls(url)
        ]
        self._pool = EndpointPool([Endpoint(public_url(str(c.base_url)), c, concurrency) for c in clients])
        self.base_url = self._pool.endpoints[0].url
        self._url = str(clients[0].base_url)  # with its credentials, for the Batch API (--batch)
        #: Input tokens counted before sending and billed, and the calls answered, for the estimates.
        self._billed = (0, 0, 0)

    @property
    def capacity(self) -> int:
        """Calls this client takes at once over all its endpoints: the number of workers worth running."""
        return self._pool.capacity

    async def _before_try(self, request: Any) -> None:
        """httpx's hook before each try the `openai` client sends: it waits its turn at the run's rate
        limiter (retries count: the server sees them); a call's second try on is a retry, counted as it
        happens (progress bars show it)."""
        await self.policy.limiter.acquire(_EXPECTED.get())
        tries = _TRIES.get(None)
        if tries is not None:
            tries[0] += 1
            self.usage.retries += tries[0] > 1

    async def _after_try(self, response: Any) -> None:
        """httpx's hook on each response: a 429 pauses the whole run for what its headers ask."""
        if response.status_code == 429:
            self.policy.limiter.pause(pause_seconds(response.headers))

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for endpoint in self._pool.endpoints:
            await endpoint.client.close()

    @property
    def structured_output(self) -> str | None:
        """The reply format the endpoint takes, "json_schema" or "text"; None until it showed."""
        if "response_format" in self.refused:
            return "text"
        return "json_schema" if self._schema_accepted else None

    async def complete(
        self,
        messages: list[dict],
        *,
        template_sha256: str,
        schema: dict[str, Any] | None = None,
    ) -> str:
        """The reply text to `messages`, from cache or the endpoint.

        `schema` (a JSON schema for one object) asks for structured output where the endpoint takes it.
        Raises `CallFailed` when this call failed after retries, `EndpointError` when no call can succeed.
        """
        return (await self.reply(messages, template_sha256=template_sha256, schema=schema)).text

    async def reply(
        self,
        messages: list[dict],
        *,
        template_sha256: str,
        schema: dict[str, Any] | None = None,
        max_tokens: int | None = None,
    ) -> Reply:
        """`complete`, with why the reply ended (finish reason "length": cut at the token limit, the
        endpoint's own or `max_tokens` where the endpoint takes it)."""
        request: dict[str, Any] = {"model": self.model, "messages": messages}
        if self.temperature is not None:
            request["temperature"] = self.temperature
        if max_tokens is not None:
            request["max_tokens"] = max_tokens
        if schema is not None:
            request["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "reply", "schema": schema, "strict": True},
            }
        # the request as intended, whatever the endpoint later refuses: a resumed run finds the same key
        key = cache_key(self.base_url, template_sha256, request)
        cached = self.cache.get(CACHE_NAMESPACE, key)
        projection = self.policy.projection
        if _is_reply_entry(cached):
            self.usage.cache_hits += 1
            if projection is not None:
                projection.add_cached(template_sha256, self.model, cached.get("completion_tokens"))
            return Reply(cached["text"], cached["finish_reason"])
        counted = count_request(self.model, messages)
        if projection is not None:
            projection.add(template_sha256, self.model, counted, max_tokens)
            raise DryRun("not sent (--dry-run)")
        expected_in, expected_out = self._expected(counted.total, max_tokens)
        if self.policy.collector is not None:
            cost = self.policy.prices.cost(self.model, expected_in, expected_out, batch=True) or 0.0
            self.policy.collector.add(self._url, self._key, self.model, self.cache, key, request, cost)
            raise DryRun("collected for the batch (--batch)")
        budget = self.policy.budget
        cost = self.policy.prices.cost(self.model, expected_in, expected_out) if budget else None
        hold = _Hold(budget, cost)
        expected = _EXPECTED.set(expected_in + (max_tokens or expected_out))  # OpenAI counts max_tokens
        spent = 0.0
        try:
            response = await self._create(request, hold)
            usage = response.usage
            billed = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
            spent = self.policy.prices.cost(self.model, *billed)
            self._billed = (self._billed[0] + counted.total, self._billed[1] + billed[0], self._billed[2] + 1)
        finally:
            _EXPECTED.reset(expected)
            hold.settle(spent or 0.0)
        choice = response.choices[0] if response.choices else None
        text = (choice.message.content if choice else None) or ""
        finish_reason = str(choice.finish_reason) if choice and choice.finish_reason else "stop"
        tokens = response.usage
        prompt_tokens = tokens.prompt_tokens if tokens else 0
        completion_tokens = tokens.completion_tokens if tokens else 0
        self.usage.record(self.model, prompt_tokens, completion_tokens)
        # in a thread: creating the entry's file can take milliseconds, which would stall every other
        # call on this event loop; the reply is still returned only once its entry is written
        await asyncio.to_thread(
            self.cache.put,
            CACHE_NAMESPACE,
            key,
            {
                "text": text,
                "finish_reason": finish_reason,
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
            },
        )
        return Reply(text, finish_reason)

    def _expected(self, counted: int, max_tokens: int | None) -> tuple[int, int]:
        """Input and output tokens a call is expected to bill: the count before sending, scaled by how
        this run's answered calls compared (billed / counted), and their mean output (at most
        `max_tokens`); before any answer, `max_tokens` or DEFAULT_OUTPUT_TOKENS."""
        counted_total, billed_total, answered = self._billed
        expected_in = round(counted * billed_total / counted_total) if counted_total else counted
        if not answered or not self.usage.calls:
            return expected_in, max_tokens or DEFAULT_OUTPUT_TOKENS
        mean_out = math.ceil(self.usage.completion_tokens / self.usage.calls)
        return expected_in, min(mean_out, max_tokens) if max_tokens else mean_out

    async def _create(self, request: dict[str, Any], hold: _Hold) -> Any:
        """One chat completion (the client retries inside). A 400 that names an optional parameter
        drops it for the rest of the run, and the request goes again without it."""
        while True:
            sent: dict[str, Any] = {}
            try:
                response = await self._call(request, sent, hold)
            except OverBudget:
                raise  # not started: not a failed call
            except (CallFailed, EndpointError):
                self.usage.failed_calls += 1
                raise
            except openai.BadRequestError as err:
                refused = {
                    name
                    for name, words in OPTIONAL_PARAMETERS.items()
                    if name in sent and any(word in str(err) for word in words)
                }
                if not refused:
                    self.usage.failed_calls += 1
                    raise self._failure(err) from None
                self.refused |= refused
                continue
            self._schema_accepted |= "response_format" in sent
            return response

    def _without_refused(self, request: dict[str, Any]) -> dict[str, Any]:
        """`request` less the optional parameters the endpoint refused so far in this run."""
        sent = {name: value for name, value in request.items() if name not in self.refused}
        limits = self.refused & {"max_tokens", "max_completion_tokens"}
        if "max_tokens" in request and limits == {"max_tokens"}:  # the newer name, once
            sent["max_completion_tokens"] = request["max_tokens"]
        return sent

    async def _call(self, request: dict[str, Any], sent: dict[str, Any], hold: _Hold) -> Any:
        """The call at the next free endpoint, its cost held in the budget once it has one. One that does
        not answer after its retries is taken out of rotation (`EndpointPool`) and the call goes to
        another; the run stops only when none is left. `sent` becomes what went out: `request` less the
        parameters refused by the time the call got its slot (a worker waits for one while another
        learns of a refusal)."""
        while True:
            endpoint = await self._pool.acquire(admit=hold.take)
            sent.clear()
            sent.update(self._without_refused(request))
            answered = True
            try:
                return await self._call_at(endpoint, sent)
            except _Unanswered as err:
                answered = False
                if len(self._pool.endpoints) == 1:
                    raise err.error from None
            finally:
                await self._pool.release(endpoint, answered=answered)
                if answered:
                    self.usage.endpoints[endpoint.url] = self.usage.endpoints.get(endpoint.url, 0) + 1
            if self._pool.all_down():
                urls = ", ".join(each.url for each in self._pool.endpoints)
                raise EndpointError(f"no endpoint answers after retries ({urls}); check --base-url")

    async def _call_at(self, endpoint: Endpoint, request: dict[str, Any]) -> Any:
        """The client's call at one endpoint, its surviving errors sorted: a 400 for the caller, else ours
        (no chaining, so no server text that might echo a secret rides along in a traceback)."""
        token = _TRIES.set([0])
        url = endpoint.url
        try:
            # `chat.completions.create(**request)` without its walk of the typed request, which leaves
            # finer's plain-JSON requests as they are (tests check) and cost a quarter of the client's
            # CPU per call (bench/RESULTS.md); retries, auth and the typed reply are the same.
            return await endpoint.client.post(
                "/chat/completions", body=request, cast_to=ChatCompletion, options=_CHAT_OPTIONS
            )
        except openai.BadRequestError:
            raise
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as err:
            raise EndpointError(
                f"{url} refused model {self.model!r} (HTTP {err.status_code}: "
                f"{self._line(err)}); check OPENAI_API_KEY, --base-url and --model"
            ) from None
        except openai.APITimeoutError:
            tries = f"{self.max_retries + 1} tries of {self.timeout:g} s"
            if not self.usage.calls:  # nothing has ever come back: every other call would wait as long
                raise _Unanswered(
                    EndpointError(
                        f"{url} sent no reply within {tries}; check the server, or raise --timeout "
                        "for a slow model"
                    )
                ) from None
            raise _Unanswered(CallFailed(f"timed out ({tries})")) from None
        except openai.APIConnectionError:
            raise _Unanswered(
                EndpointError(f"cannot reach {url} after retries; check --base-url / OPENAI_BASE_URL")
            ) from None
        except openai.APIError as err:
            raise self._failure(err) from None
        finally:
            _TRIES.reset(token)

    def _failure(self, err: openai.APIError) -> CallFailed:
        status = getattr(err, "status_code", None)
        return CallFailed(f"HTTP {status}: {self._line(err)}" if status else self._line(err))

    def _line(self, err: BaseException) -> str:
        """One line of an error for users and build.json, with any secret masked."""
        body = getattr(err, "body", None)
        message = body.get("message") if isinstance(body, dict) else None
        if not isinstance(message, str):
            message = err.message if isinstance(err, openai.APIError) else str(err)
        return _redact(" ".join(message.split()), self._key)[:200]
