"""Source builders: one module per dataset, each reading the official layout (see `base.Source`).

The module name gives the source name (`stanford_dogs.py` holds "stanford-dogs"), so adding a source is
adding one module; modules are imported on first use, so one source's dependencies never slow another.
"""

from __future__ import annotations

import pkgutil
from functools import cache
from importlib import import_module

from finer.errors import FinerError

from .base import ImageRecord, LayoutError, Source, SourceTerms, inside

#: Every source name, from the modules of this package (all but `base` and private ones).
SOURCES: tuple[str, ...] = tuple(
    sorted(
        info.name.replace("_", "-")
        for info in pkgutil.iter_modules(__path__)
        if info.name != "base" and not info.name.startswith("_")
    )
)


@cache
def get_source(name: str) -> type[Source]:
    """The source class registered under `name`, or a one-line error listing the known names."""
    if name not in SOURCES:
        raise FinerError(f"unknown source {name!r}; choose one of: {', '.join(SOURCES)}")
    module = import_module(f"{__name__}.{name.replace('-', '_')}")
    found = [
        value
        for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, Source) and vars(value).get("name") == name
    ]
    if len(found) != 1:
        raise FinerError(f"{module.__name__} must define one Source subclass with name = {name!r}")
    return found[0]


def source_class(name: str) -> type[Source]:
    """`get_source(name)`, or the base `Source` for a name finer does not know (rows built elsewhere): its
    class attributes are the defaults (unknown terms, no closed list, `name` in exports), so readers of
    a source's facts need no special case."""
    return get_source(name) if name in SOURCES else Source


__all__ = [
    "SOURCES",
    "ImageRecord",
    "LayoutError",
    "Source",
    "SourceTerms",
    "get_source",
    "inside",
    "source_class",
]
