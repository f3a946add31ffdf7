"""Wikipedia knowledge for fine concepts (docs/design.md §1, "Knowledge").

For each distinct fine name: search, take the top hit — and when that is a disambiguation page or there is
none, search again with the superordinate appended ("Chihuahua dog") —, follow redirects, keep the
preferred section ("Description" for organisms, "Design" for aircraft and cars) or else the whole page,
and cut it to `words` words. The result lands in `concept.knowledge`.

Every request goes through the `wikipedia-api` library (search, `info`, `extracts`). `_MediaWiki` is the
one seam, a small subclass: the library hard-codes `https://{lang}.wikipedia.org/w/api.php`, has no
disambiguation check, and retries by itself without jitter, honouring `Retry-After` on 429 only. So the
subclass points it at `api_url` (a mirror, or the test server), asks `info` for `pageprops` too, and turns
429, 5xx and MediaWiki's own "lagged / rate limited" errors into one retryable error carrying
`Retry-After`; retries live here, with the library's own switched off.
"""

from __future__ import annotations

import dataclasses
import email.utils
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import wikipediaapi
from tqdm.auto import tqdm

import finer
from finer.cache import Cache, cache_key
from finer.errors import FinerError
from finer.schema import Concept, Knowledge

WIKIPEDIA_API = "https://{lang}.wikipedia.org/w/api.php"
# Wikimedia's User-Agent policy: name the tool and a way to reach its operator; the library appends its
# own. FINER_CONTACT (an e-mail or URL) is the operator's; without it the agent still names the tool.
USER_AGENT = (
    f"finer/{finer.__version__} (fine-grained recognition research toolkit"
    f"{'; ' + os.environ['FINER_CONTACT'] if os.environ.get('FINER_CONTACT') else ''})"
)
CACHE_NAMESPACE = "wiki"
# Preferred sections by superordinate, first present wins; "*" is every other superordinate (organisms).
DEFAULT_SECTIONS: dict[str, tuple[str, ...]] = {
    "Airplane": ("Design",),
    "Car": ("Design",),
    "*": ("Description",),
}
MAX_BACKOFF_S = 60.0
MAX_RETRY_AFTER_S = 300.0  # a server asking for longer gets a later retry, not a stalled build
# MediaWiki answers these with HTTP 200 and an error body; they clear up when waited for.
RETRYABLE_API_ERRORS = frozenset({"maxlag", "ratelimited", "readonly"})

T = TypeVar("T")


@dataclass
class WikiStats:
    """What one `fetch_knowledge` run did, for build.json."""

    concepts: int = 0
    lookups: int = 0  # distinct (fine name, superordinate) pairs: each is fetched at most once
    requests: int = 0  # HTTP requests sent, retries included
    retries: int = 0
    cache_hits: int = 0
    status: dict[str, int] = field(default_factory=dict)  # per concept: found / missing / disambiguation
    failures: list[dict[str, str]] = field(default_factory=list)  # {"concept_id", "reason"}


def fetch_knowledge(
    concepts: list[Concept],
    *,
    api_url: str | None = None,
    lang: str = "en",
    words: int = 256,
    concurrency: int = 4,
    cache: Cache | None = None,
    progress: bool = True,
    sections: Mapping[str, Sequence[str]] | None = None,
    max_retries: int = 5,
    retry_base: float = 1.0,
) -> WikiStats:
    """Set `knowledge` on every concept from Wikipedia, or from the MediaWiki API at `api_url`.

    Concepts sharing a fine name and superordinate are looked up once, at most `concurrency` at a time;
    finished lookups go to `cache` (the default cache when None), so a re-run sends no request. A lookup
    that still fails after `max_retries` retries (backoff from `retry_base` seconds) leaves its concepts
    `missing` and is listed in the returned stats, never raised: one bad page must not sink a build. Only
    an endpoint that cannot be reached at all (no lookup has got through and one fails on the connection)
    stops the run, with a `FinerError`: otherwise every concept would wait out its retries for nothing.
    `sections` maps a superordinate to its preferred section names (see `DEFAULT_SECTIONS`); `api_url`
    may contain `{lang}`.
    """
    if words < 1 or concurrency < 1 or max_retries < 0:
        raise FinerError("wiki: words and concurrency must be at least 1, max_retries at least 0")
    url = (api_url or WIKIPEDIA_API).replace("{lang}", lang)
    cache = cache if cache is not None else Cache()
    preferences = {
        k.casefold(): tuple(v) for k, v in (DEFAULT_SECTIONS if sections is None else sections).items()
    }
    groups: dict[_Query, list[Concept]] = {}
    for concept in concepts:
        groups.setdefault(_Query.of(concept, preferences), []).append(concept)

    stats = WikiStats(concepts=len(concepts), lookups=len(groups))
    tally: Counter[str] = Counter()
    fetcher = _Fetcher(url, lang, words, max_retries, retry_base)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="finer-wiki")
    bar = tqdm(total=len(groups), desc="wikipedia", unit=" concept", dynamic_ncols=True, disable=not progress)

    def settle(members: list[Concept], knowledge: Knowledge, outcome: str) -> None:
        for concept in members:
            concept.knowledge = dataclasses.replace(knowledge)
        tally[outcome] += 1
        bar.set_postfix(tally, refresh=False)
        bar.update()

    try:
        pending: dict[Future[Knowledge], tuple[str, list[Concept]]] = {}
        for query, members in groups.items():
            key = cache_key(url, lang, query.name, query.fallback, words, list(query.sections))
            cached = cache.get(CACHE_NAMESPACE, key, valid=_is_knowledge_entry)
            if cached is not None:
                stats.cache_hits += 1
                settle(members, Knowledge(**cached), "cached")
            else:
                pending[pool.submit(fetcher.fetch, query)] = (key, members)
        reached = False
        for future in as_completed(pending):
            key, members = pending[future]
            try:
                knowledge = future.result()
            except Exception as err:  # whatever sank this lookup is this lookup's, not the build's
                reason = _describe(err)
                if not reached and _unreachable(err):
                    raise FinerError(
                        f"wikipedia: cannot reach {url} ({reason}); check the network, pass --wiki-api URL "
                        "of a reachable mirror, give each concept's text offline (--knowledge-file "
                        "concepts.jsonl), or build with --no-knowledge (no attributes: no --format finer)"
                    ) from None
                stats.failures.extend({"concept_id": c.concept_id, "reason": reason} for c in members)
                settle(members, Knowledge(text="", status="missing"), "failed")
                continue
            reached = True
            cache.put(CACHE_NAMESPACE, key, dataclasses.asdict(knowledge))
            settle(members, knowledge, knowledge.status)
    finally:
        pool.shutdown(cancel_futures=True)
        fetcher.close()
        bar.close()
    stats.requests, stats.retries = fetcher.requests, fetcher.retries
    stats.status = dict(Counter(c.knowledge.status for c in concepts if c.knowledge))
    return stats


_KNOWLEDGE_FIELDS = {f.name for f in dataclasses.fields(Knowledge)}


def _is_knowledge_entry(entry: Any) -> bool:
    """A cached page of this finer's `Knowledge` shape (another version's is fetched again)."""
    return (
        isinstance(entry, dict)
        and set(entry) <= _KNOWLEDGE_FIELDS
        and isinstance(entry.get("text"), str)
        and isinstance(entry.get("status"), str)
    )


@dataclass(frozen=True)
class _Query:
    """One lookup: what concepts with the same fine name and superordinate share."""

    name: str
    fallback: str  # the name with the superordinate appended; "" without a superordinate
    sections: tuple[str, ...]

    @classmethod
    def of(cls, concept: Concept, preferences: Mapping[str, tuple[str, ...]]) -> _Query:
        """`preferences` keys are casefolded superordinates."""
        sup = concept.superordinate.strip()
        wanted = preferences.get(sup.casefold(), preferences.get("*", ()))
        return cls(concept.name, f"{concept.name} {sup.lower()}" if sup else "", wanted)


class _ReplyError(wikipediaapi.WikipediaException):
    """A reply that is not an answer: HTTP 429/5xx or a MediaWiki error body."""

    def __init__(self, reason: str, *, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after


class _MediaWiki(wikipediaapi.Wikipedia):
    """`wikipediaapi.Wikipedia` against any MediaWiki-compatible `api.php`, with finer's user agent."""

    def __init__(self, api_url: str, lang: str, on_request: Callable[[httpx.Request], None]) -> None:
        super().__init__(
            user_agent=USER_AGENT,
            language=lang,
            extract_format=wikipediaapi.ExtractFormat.WIKI,
            max_retries=0,
            event_hooks={"request": [on_request]},
        )
        self.api_url = api_url

    def close(self) -> None:
        """Close the connection pool (the library offers no way to)."""
        self._client.close()

    def _build_url(self, language: str) -> str:  # the library's is a fixed wikipedia.org URL
        return self.api_url

    def _info_params(self, page: Any) -> dict[str, Any]:
        """`info` plus `pageprops=disambiguation` (the library has no disambiguation check) and only the
        `inprop` we read (the library asks for watcher counts and more)."""
        params = super()._info_params(page)
        return {**params, "prop": "info|pageprops", "ppprop": "disambiguation", "inprop": "url"}

    def _process_response(self, r: Any, url: str) -> dict[str, Any]:
        if r.status_code == 429 or r.status_code >= 500:
            retry_after = _retry_after(r.headers.get("Retry-After"))
            raise _ReplyError(f"HTTP {r.status_code}", retryable=True, retry_after=retry_after)
        reply = super()._process_response(r, url)
        error = reply.get("error") if isinstance(reply, dict) else None
        if error:
            code = str(error.get("code", "?"))
            raise _ReplyError(
                f"API error {code}: {error.get('info', '')}",
                retryable=code in RETRYABLE_API_ERRORS,
                retry_after=_retry_after(r.headers.get("Retry-After")),
            )
        return reply


class _Fetcher:
    """Lookups on worker threads, all through one library client (httpx clients may be shared by threads)."""

    def __init__(self, api_url: str, lang: str, words: int, max_retries: int, retry_base: float) -> None:
        self.words = words
        self.max_retries, self.retry_base = max_retries, retry_base
        self.requests = self.retries = 0
        self._lock = threading.Lock()
        self._wiki = _MediaWiki(api_url, lang, self._count)

    def close(self) -> None:
        self._wiki.close()

    def _count(self, request: httpx.Request) -> None:
        with self._lock:
            self.requests += 1

    def fetch(self, query: _Query) -> Knowledge:
        """The knowledge for one query: the top hit, or the fallback's when the top hit is no article."""
        page, status = self._resolve(query.name)
        if status != "found" and query.fallback:
            other, other_status = self._resolve(query.fallback)
            if other_status == "found" or status == "missing":
                page, status = other, other_status
        if page is None:
            return Knowledge(text="", status="missing")
        meta = {"title": page.title, "url": page.fullurl or "", "revision_id": page.lastrevid}
        if status == "disambiguation":
            return Knowledge(text="", status="disambiguation", **meta)
        self._call(f"page {page.title!r}", lambda: page.sections)  # the `extracts` request
        section, text = _pick_section(page, query.sections)
        return Knowledge(text=" ".join(text.split()[: self.words]), status="found", section=section, **meta)

    def _resolve(self, text: str) -> tuple[Any, str]:
        """The top search hit for `text` after redirects, and whether it is an article."""
        hits = self._call(f"search {text!r}", lambda: self._wiki.search(text, limit=1))
        page = next(iter(hits.pages.values()), None)
        if page is None:
            return None, "missing"
        self._call(f"page {page.title!r}", lambda: page.lastrevid)  # the `info` request: follows redirects
        if not page.exists():
            return None, "missing"
        if "disambiguation" in (getattr(page, "pageprops", None) or {}):
            return page, "disambiguation"
        return page, "found"

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """`fn()`, retried on transient failures with exponential backoff, jitter and `Retry-After`."""
        attempt = 0
        while True:
            try:
                return fn()
            except wikipediaapi.WikipediaException as err:
                if attempt == self.max_retries or not _retryable(err):
                    raise _LookupFailed(f"{what}: {_describe(err)} after {attempt + 1} attempt(s)") from err
                backoff = min(MAX_BACKOFF_S, self.retry_base * 2**attempt) * random.uniform(0.5, 1.0)
                retry_after = getattr(err, "retry_after", None)
                if retry_after is not None:
                    backoff = max(min(retry_after, MAX_RETRY_AFTER_S), backoff)
                with self._lock:
                    self.retries += 1
                time.sleep(backoff)
                attempt += 1


class _LookupFailed(Exception):
    """A lookup given up on; the message is the one-line reason recorded in the stats."""


def _retryable(err: Exception) -> bool:
    if isinstance(err, _ReplyError):
        return err.retryable
    return isinstance(err, (wikipediaapi.WikiHttpTimeoutError, wikipediaapi.WikiConnectionError))


def _unreachable(err: BaseException) -> bool:
    """The lookup never got a reply: the connection failed or timed out on every attempt."""
    cause = err.__cause__ if isinstance(err, _LookupFailed) else err
    return isinstance(cause, (wikipediaapi.WikiHttpTimeoutError, wikipediaapi.WikiConnectionError))


def _describe(err: BaseException) -> str:
    """One line for the stats: what failed, without a traceback."""
    if isinstance(err, (_LookupFailed, _ReplyError)):
        text = str(err)
    elif isinstance(err, wikipediaapi.WikiHttpError):
        text = f"HTTP {err.status_code}"
    elif isinstance(err, wikipediaapi.WikiHttpTimeoutError):
        text = "timed out"
    elif isinstance(err, wikipediaapi.WikiConnectionError):
        text = "connection failed"
    elif isinstance(err, wikipediaapi.WikiInvalidJsonError):
        text = "reply is not JSON"
    else:
        text = f"{type(err).__name__}: {err}"
    return (text.splitlines() or [""])[0][:300]


def _retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header: a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _walk(sections: Sequence[Any]) -> Iterator[Any]:
    for section in sections:
        yield section
        yield from _walk(section.sections)


def _pick_section(page: Any, preferred: Sequence[str]) -> tuple[str, str]:
    """(title, text with subsections) of the first preferred section that has text; else ("", whole page)."""
    every = list(_walk(page.sections))
    for name in preferred:
        for section in every:
            if section.title.casefold() == name.casefold():
                text = "\n\n".join([section.text, *(sub.full_text() for sub in section.sections)])
                if text.strip():
                    return section.title, text
    return "", page.text
