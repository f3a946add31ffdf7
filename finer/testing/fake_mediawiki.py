"""A MediaWiki-compatible `api.php` on 127.0.0.1, so knowledge tests run offline (docs/design.md §6).

It answers what `finer.data.wiki` sends through `wikipedia-api` — `list=search`,
`prop=info|pageprops|extracts`
(`inprop=url`, `ppprop`, `explaintext` with `exsectionformat=wiki|plain`, `exintro`), title normalisation
and `redirects` — in the JSON shape of the real API (formatversion 1). Anything else gets a MediaWiki-style
`{"error": …}` reply: a client change the fake does not cover then fails a test instead of passing against
a guess. Faults (429 with Retry-After, 5xx, slow replies) are injectable; the server logs every request
and the most it had in flight at once, so tests can count calls and check politeness.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

API_PATH = "/w/api.php"


@dataclass
class FakePage:
    """One page: `text` is its plain-text extract with `== Heading ==` lines, as `exsectionformat=wiki`
    returns it; a redirect page has only `redirect` (the target title)."""

    text: str = ""
    revid: int = 1
    disambiguation: bool = False
    redirect: str | None = None

    @classmethod
    def article(cls, summary: str, sections: Mapping[str, str] | None = None, *, revid: int = 1) -> FakePage:
        """A page laid out as TextExtracts lays one out (blank lines before each level-2 heading)."""
        body = "".join(f"\n\n\n== {title} ==\n{text}" for title, text in (sections or {}).items())
        return cls(text=summary + body, revid=revid)


@dataclass
class Fault:
    """Answer `status` (with `Retry-After: retry_after` when given) to the next `times` requests with
    a parameter value containing `match` (any request when None; every one when `times` is None).

    With `error` (a MediaWiki error code such as "maxlag") the reply is that API error body instead,
    which Wikimedia sends with status 200.
    """

    status: int
    match: str | None = None
    times: int | None = 1
    retry_after: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Request:
    """One request as the server saw it."""

    params: dict[str, str]
    user_agent: str
    started: float  # time.monotonic() on arrival
    status: int


class FakeMediaWiki:
    """`with FakeMediaWiki(pages) as wiki:` serves `pages` (title → `FakePage` or extract text) at `wiki.url`.

    Search: `search[query]` when given, else every title containing all the query's words, exact title
    first, then shorter titles. `delay` (seconds) slows every reply.
    """

    def __init__(
        self,
        pages: Mapping[str, FakePage | str],
        *,
        search: Mapping[str, Sequence[str]] | None = None,
        faults: Iterable[Fault] = (),
        delay: float = 0.0,
        lang: str = "en",
    ) -> None:
        self.pages = {t: p if isinstance(p, FakePage) else FakePage(text=p) for t, p in pages.items()}
        self.search = dict(search or {})
        self.faults = list(faults)
        self.delay = delay
        self.lang = lang
        self.max_in_flight = 0
        self._ids = {title: 100 + i for i, title in enumerate(self.pages)}
        self._log: list[Request] = []
        self._in_flight = 0
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------

    def __enter__(self) -> FakeMediaWiki:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        # a short poll keeps `__exit__` quick (shutdown waits for the serving loop to look up)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), name="fake-mediawiki", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    @property
    def base(self) -> str:
        """`http://127.0.0.1:<port>`, the server's origin."""
        assert self._server is not None, "use FakeMediaWiki as a context manager"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        """The api.php endpoint, what `wiki_api` / `--wiki-api` take."""
        return self.base + API_PATH

    @property
    def log(self) -> list[Request]:
        """Every request so far, in arrival order."""
        with self._lock:
            return sorted(self._log, key=lambda r: r.started)

    @property
    def requests(self) -> int:
        """How many HTTP requests arrived (faulted ones included)."""
        with self._lock:
            return len(self._log)

    # -- request handling --------------------------------------------------------------------------------

    def _arrive(self) -> None:
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)

    def _leave(self, request: Request) -> None:
        with self._lock:
            self._in_flight -= 1
            self._log.append(request)

    def _take_fault(self, params: Mapping[str, str]) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times == 0:
                    continue
                needle = (fault.match or "").casefold()
                if fault.match is None or any(needle in v.casefold() for v in params.values()):
                    if fault.times is not None:
                        fault.times -= 1
                    return fault
        return None

    def answer(self, params: Mapping[str, str]) -> dict[str, Any]:
        """The API's JSON reply to one GET (no faults, no delay)."""
        if params.get("format") != "json":
            return _error("fake-unsupported", "only format=json is served")
        if params.get("action") != "query":
            return _error("badvalue", f"unsupported action: {params.get('action')!r}")
        if "list" in params and "prop" not in params:
            if params["list"] != "search":
                return _error("fake-unsupported", f"list={params['list']} is not served")
            return self._search(params)
        if "prop" in params and "list" not in params:
            return self._props(params)
        return _error("fake-unsupported", "send exactly one of list= and prop=")

    def _search(self, params: Mapping[str, str]) -> dict[str, Any]:
        query = params.get("srsearch", "")
        if not query.strip():
            return _error("missingparam", "The srsearch parameter must be set.")
        if params.get("srnamespace", "0") != "0":
            return _error("fake-unsupported", "only the main namespace is served")
        hits = self._hits(query)
        limit = int(params.get("srlimit", "10"))
        rows = [
            {
                "ns": 0,
                "title": t,
                "pageid": self._ids[t],
                "size": len(self.pages[t].text.encode()),
                "wordcount": len(self.pages[t].text.split()),
                "snippet": "",
                "timestamp": "2024-01-01T00:00:00Z",
            }
            for t in hits[:limit]
        ]
        return {"batchcomplete": "", "query": {"searchinfo": {"totalhits": len(hits)}, "search": rows}}

    def _hits(self, query: str) -> list[str]:
        if query in self.search:
            return [t for t in self.search[query] if t in self.pages]
        words = set(_words(query))
        found = [t for t in self.pages if words <= set(_words(t))]
        return sorted(found, key=lambda t: (t.casefold() != query.casefold(), len(_words(t)), t))

    def _props(self, params: Mapping[str, str]) -> dict[str, Any]:
        props = set(params["prop"].split("|"))
        unknown = props - {"info", "pageprops", "extracts"}
        if unknown:
            return _error("fake-unsupported", f"prop={'|'.join(sorted(unknown))} is not served")
        if not params.get("titles"):
            return _error("fake-unsupported", "only titles= is served")
        if "extracts" in props and "explaintext" not in params:
            return _error("fake-unsupported", "only plain-text extracts (explaintext) are served")
        for name in ("exsentences", "exchars", "exlimit", "excontinue"):
            if name in params:
                return _error("fake-unsupported", f"{name} is not served")
        style = params.get("exsectionformat", "wiki")
        if style not in ("wiki", "plain"):
            return _error("fake-unsupported", f"exsectionformat={style} is not served")
        query: dict[str, Any] = {}
        pages: dict[str, Any] = {}
        missing = -1
        for raw in params["titles"].split("|"):
            title = _normalise(raw)
            if title != raw:
                query.setdefault("normalized", []).append({"from": raw, "to": title})
            seen = set()
            while "redirects" in params and title in self.pages and self.pages[title].redirect:
                if title in seen:
                    break
                seen.add(title)
                target = self.pages[title].redirect or ""
                query.setdefault("redirects", []).append({"from": title, "to": target})
                title = target
            page = self.pages.get(title)
            if page is None:
                pages[str(missing)] = {"ns": 0, "title": title, "missing": ""}
                missing -= 1
                continue
            entry: dict[str, Any] = {"pageid": self._ids[title], "ns": 0, "title": title}
            if "info" in props:
                entry.update(self._info(title, page, params.get("inprop", "").split("|")))
            if "pageprops" in props:
                wanted = params.get("ppprop")
                if page.disambiguation and (wanted is None or "disambiguation" in wanted.split("|")):
                    entry["pageprops"] = {"disambiguation": ""}
            if "extracts" in props:
                text = "" if page.redirect else page.text
                if "exintro" in params:
                    text = re.split(r"\n\n+ *==", text, maxsplit=1)[0]
                if style == "plain":
                    text = re.sub(r"^ *(==+) (.*?) \1 *$", r"\2", text, flags=re.M)
                entry["extract"] = text
            pages[str(self._ids[title])] = entry
        query["pages"] = pages
        return {"batchcomplete": "", "query": query}

    def _info(self, title: str, page: FakePage, inprop: list[str]) -> dict[str, Any]:
        info: dict[str, Any] = {
            "contentmodel": "wikitext",
            "pagelanguage": self.lang,
            "pagelanguagehtmlcode": self.lang,
            "pagelanguagedir": "ltr",
            "touched": "2024-01-01T00:00:00Z",
            "lastrevid": page.revid,
            "length": len(page.text.encode()),
        }
        if page.redirect:
            info["redirect"] = ""
        if "url" in inprop:
            url = f"{self.base}/wiki/{quote(title.replace(' ', '_'), safe='/:(),!')}"
            info.update(fullurl=url, editurl=f"{self.base}/w/index.php?action=edit&title=", canonicalurl=url)
        return info


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (a timeout) is not a server error worth printing."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    fake: FakeMediaWiki


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        fake = self.server.fake
        split = urlsplit(self.path)
        params = dict(parse_qsl(split.query, keep_blank_values=True))
        started = time.monotonic()
        fake._arrive()
        status, left = 200, False
        try:
            if fake.delay:
                time.sleep(fake.delay)
            fault = fake._take_fault(params)
            headers = {"Content-Type": "application/json; charset=utf-8"}
            if split.path != API_PATH:
                status, body = 404, {"error": {"code": "notfound", "info": split.path}}
            elif fault is not None:
                status, body = fault.status, _error(fault.error or "fault", f"injected {fault.status}")
                if fault.retry_after is not None:
                    headers["Retry-After"] = fault.retry_after
            else:
                body = fake.answer(params)
            payload = json.dumps(body).encode()
            # Leave before replying: the client may send its next request as soon as it reads this one.
            fake._leave(Request(params, self.headers.get("User-Agent", ""), started, status))
            left = True
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout): the request still counts
        finally:
            if not left:
                fake._leave(Request(params, self.headers.get("User-Agent", ""), started, status))

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read `FakeMediaWiki.log` instead."""


def _error(code: str, info: str) -> dict[str, Any]:
    return {"error": {"code": code, "info": info}, "servedby": "fake-mediawiki"}


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.casefold())


def _normalise(title: str) -> str:
    """MediaWiki's title normalisation, the part that matters here: `_` → space, first letter upper."""
    title = " ".join(title.replace("_", " ").split())
    return title[:1].upper() + title[1:]
