"""Render the prompt templates in ``prompts/*.jinja`` into chat messages.

Template file syntax (every template repeats it in a header comment):

* The file is Jinja text, rendered in a sandbox with strict undefined variables: a variable the
  template uses but the caller did not pass is an error, not an empty string. Optional variables
  are tested with ``is defined``; a variable that may be ``None`` is tested with ``is none``.
* A line holding only ``[system]``, ``[user]`` or ``[assistant]`` starts a new message with that
  role. Only blank lines and Jinja comments may come before the first marker.
* The token ``<image>`` (anywhere in a line) is an image slot: the message content gets an
  ``{"type": "image"}`` block there, in order. The text around it becomes ``{"type": "text"}``
  blocks, each stripped of surrounding whitespace (blank lines included); empty ones are dropped.
* Markers must be written literally in the template. What ``{{ ... }}`` prints is data: an
  attribute list or a Wikipedia text containing ``[user]`` or ``<image>`` stays plain text.
* Helpers: ``fail("message")`` stops rendering with that message (e.g. an unknown ``level``);
  the filter ``text | fence`` gives a backtick fence longer than any backtick run in ``text``, so
  quoted data cannot close its own block.

A user's folder (``prompts_dir``) overrides templates by file name (``direct.jinja``, ...);
names it lacks fall back to the packaged templates.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import re
from collections.abc import Callable, Sequence
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import jinja2
from jinja2.loaders import split_template_path
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from finer.errors import FinerError

__all__ = [
    "TemplateError",
    "available_templates",
    "render",
    "template_sha256",
    "template_source",
    "to_openai",
]

SUFFIX = ".jinja"
ROLES = ("system", "user", "assistant")
IMAGE_TOKEN = "<image>"

_NAME = re.compile(r"[A-Za-z0-9_-]+")
_ROLE_LINE = re.compile(r"^[ \t]*\[(" + "|".join(ROLES) + r")\][ \t]*$", re.MULTILINE)
# Printed values are escaped with a private-use character so that markers inside data never
# parse as markers; the text blocks are unescaped after parsing.
_ESC = "\ue000"
_ESCAPES = {_ESC: _ESC + "e", "[": _ESC + "b", "<": _ESC + "l"}
_UNESCAPES = {code[1]: char for char, code in _ESCAPES.items()}
_ESCAPED = re.compile(re.escape(_ESC) + "(.)", re.DOTALL)


class TemplateError(FinerError):
    """A prompt template is missing, malformed, unsafe, or was rendered without a variable it needs."""


class _MissingVariable(jinja2.UndefinedError):
    """An UndefinedError that remembers which name was missing, for a one-line message."""

    def __init__(self, message: str | None, *, variable: str | None, top_level: bool) -> None:
        super().__init__(message)
        self.variable = variable
        self.top_level = top_level


class _Undefined(jinja2.StrictUndefined):
    """StrictUndefined whose error says which variable was missing (Jinja's only says it in prose)."""

    __slots__ = ()

    def __init__(
        self,
        hint: str | None = None,
        obj: Any = jinja2.runtime.missing,
        name: str | None = None,
        exc: type[jinja2.TemplateRuntimeError] = jinja2.UndefinedError,
    ) -> None:
        if exc is jinja2.UndefinedError:
            exc = functools.partial(  # type: ignore[assignment]
                _MissingVariable, variable=name, top_level=obj is jinja2.runtime.missing
            )
        super().__init__(hint, obj, name, exc)


class _Fail(Exception):
    """Raised by the ``fail()`` helper a template calls on bad input."""


def _fail(message: str) -> None:
    raise _Fail(message)


def _fence(text: Any) -> str:
    """A backtick fence the quoted text cannot close, however many backticks it holds."""
    runs = re.findall(r"`+", str(text))
    return "`" * max(3, 1 + max((len(run) for run in runs), default=0))


def _finalize(value: Any) -> str:
    """Applied to everything ``{{ ... }}`` prints: escape marker characters in data."""
    text = str(value)
    return "".join(_ESCAPES.get(char, char) for char in text)


def _unescape(text: str) -> str:
    return _ESCAPED.sub(lambda m: _UNESCAPES.get(m.group(1), m.group(0)), text)


class _ResourceLoader(jinja2.BaseLoader):
    """Loads the packaged templates through importlib.resources, so a zipped install works too.

    Names are split as Jinja's own loaders split them: a `..` segment is refused and a leading `/` is
    dropped, so an `{% include %}` can only reach the packaged templates, never a file beside them.
    """

    def __init__(self, root: Traversable) -> None:
        self.root = root

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, None, Any]:
        resource = self.root.joinpath(*split_template_path(template))
        if not resource.is_file():
            raise jinja2.TemplateNotFound(template)
        return resource.read_text(encoding="utf-8"), None, lambda: True

    def list_templates(self) -> list[str]:
        return sorted(entry.name for entry in self.root.iterdir() if entry.is_file())


class _FolderLoader(jinja2.FileSystemLoader):
    """A user's prompts folder, confined to it: a link that leads outside is not a template.

    `FileSystemLoader` already refuses `..` and absolute names, but it follows symbolic links, and a
    shared prompt pack could link `direct.jinja` to a token file whose text would then go to the endpoint.
    """

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str | None, Callable[[], bool] | None]:
        source, filename, uptodate = super().get_source(environment, template)
        root = Path(self.searchpath[0]).resolve()
        if filename is None or not Path(filename).resolve().is_relative_to(root):
            raise jinja2.TemplateNotFound(template)
        return source, filename, uptodate


@functools.cache
def _environment(prompts_dir: Path | None) -> ImmutableSandboxedEnvironment:
    loaders: list[jinja2.BaseLoader] = [_ResourceLoader(importlib.resources.files("finer.prompt_templates"))]
    if prompts_dir is not None:
        loaders.insert(0, _FolderLoader(prompts_dir, encoding="utf-8"))
    env = ImmutableSandboxedEnvironment(
        loader=jinja2.ChoiceLoader(loaders),
        undefined=_Undefined,
        finalize=_finalize,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.globals["fail"] = _fail
    env.filters["fence"] = _fence
    return env


def _resolve_dir(prompts_dir: Path | str | None) -> Path | None:
    if prompts_dir is None:
        return None
    path = Path(prompts_dir).expanduser().resolve()
    if not path.is_dir():
        raise TemplateError(f"prompts dir {str(prompts_dir)!r} is not a directory")
    return path


def available_templates(prompts_dir: Path | str | None = None) -> list[str]:
    """Template names a caller may render: the packaged ones plus any in ``prompts_dir``."""
    env = _environment(_resolve_dir(prompts_dir))
    return sorted({f[: -len(SUFFIX)] for f in env.list_templates() if f.endswith(SUFFIX) and "/" not in f})


def _checked_name(name: str, prompts_dir: Path | None) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        names = ", ".join(available_templates(prompts_dir))
        raise TemplateError(f"invalid template name {name!r}; available: {names}")
    return name + SUFFIX


def _not_found(name: str, prompts_dir: Path | None) -> TemplateError:
    return TemplateError(
        f"unknown template {name!r}; available: {', '.join(available_templates(prompts_dir))}"
    )


def template_source(name: str, prompts_dir: Path | str | None = None) -> str:
    """The source text of the template that ``render`` would use (the user's copy if it has one)."""
    directory = _resolve_dir(prompts_dir)
    env = _environment(directory)
    try:
        source, _, _ = env.loader.get_source(env, _checked_name(name, directory))  # type: ignore[union-attr]
    except jinja2.TemplateNotFound:
        raise _not_found(name, directory) from None
    return source


def template_sha256(name: str, prompts_dir: Path | str | None = None) -> str:
    """Hex SHA-256 of the template source: cached predictions are keyed by it, so edits invalidate them."""
    return hashlib.sha256(template_source(name, prompts_dir).encode("utf-8")).hexdigest()


def _load(name: str, prompts_dir: Path | str | None) -> jinja2.Template:
    directory = _resolve_dir(prompts_dir)
    try:
        return _environment(directory).get_template(_checked_name(name, directory))
    except jinja2.TemplateNotFound:
        raise _not_found(name, directory) from None
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"template {name!r} line {e.lineno}: syntax error: {e.message}") from None


def render(name: str, /, *, prompts_dir: Path | str | None = None, **variables: Any) -> list[dict]:
    """Render template ``name`` into chat messages with ``{"type": "image"}`` placeholders.

    The shape is what TRL's VLM SFT and transformers' processor chat templates take:
    ``[{"role": ..., "content": [{"type": "image"}, {"type": "text", "text": ...}]}]``.
    """
    template = _load(name, prompts_dir)
    try:
        text = template.render(**variables)
    except _MissingVariable as e:
        if e.top_level:
            raise TemplateError(
                f"template {name!r}: undefined variable {e.variable!r}; pass it or fix the template"
            ) from None
        raise TemplateError(
            f"template {name!r}: {e.message}; check the value passed or fix the template"
        ) from None
    except SecurityError as e:
        raise TemplateError(
            f"template {name!r}: refused unsafe access ({e}); templates may not reach Python internals"
        ) from None
    except _Fail as e:
        raise TemplateError(f"template {name!r}: {e}") from None
    except (jinja2.TemplateError, TypeError, ValueError, LookupError, ArithmeticError) as e:
        raise TemplateError(f"template {name!r}: {type(e).__name__}: {e}") from None
    return _parse(name, text)


def _parse(name: str, text: str) -> list[dict]:
    """Split rendered text at role-marker lines and ``<image>`` tokens into messages."""
    parts = _ROLE_LINE.split(text)
    if parts[0].strip():
        first = parts[0].strip().splitlines()[0]
        raise TemplateError(
            f"template {name!r}: text before the first role marker ({first!r}); "
            "start each message with a line [system], [user] or [assistant]"
        )
    if len(parts) == 1:
        raise TemplateError(
            f"template {name!r}: no messages; start one with a line [system], [user] or [assistant]"
        )
    messages = []
    for role, body in zip(parts[1::2], parts[2::2], strict=True):
        content: list[dict] = []
        for i, chunk in enumerate(body.split(IMAGE_TOKEN)):
            if i:
                content.append({"type": "image"})
            chunk = chunk.strip()
            if chunk:
                content.append({"type": "text", "text": _unescape(chunk)})
        if not content:
            content.append({"type": "text", "text": ""})
        messages.append({"role": role, "content": content})
    return messages


def to_openai(messages: Sequence[dict], images: Sequence[str]) -> list[dict]:
    """Fill the image slots with OpenAI ``image_url`` blocks (data URLs), in order.

    The counts must agree: a template with more or fewer ``<image>`` slots than the caller has
    images would silently send the wrong picture, so that is an error.
    """
    slots = sum(block.get("type") == "image" for m in messages for block in m["content"])
    if slots != len(images):
        raise TemplateError(
            f"prompt has {slots} image slot(s) but {len(images)} image(s) were given; "
            "make the template's <image> tokens match the images"
        )
    urls = iter(images)
    converted = []
    for message in messages:
        content = [
            {"type": "image_url", "image_url": {"url": next(urls)}}
            if block.get("type") == "image"
            else dict(block)
            for block in message["content"]
        ]
        converted.append({"role": message["role"], "content": content})
    return converted
