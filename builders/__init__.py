"""Source builders: one module per dataset, each reading the official layout (see `base.Source`)."""

from __future__ import annotations

from importlib import import_module

from finer.errors import FinerError

from .base import ImageRecord, LayoutError, Source, inside

#: Source name -> "module:Class"; imported lazily so one source's dependencies never slow another.
SOURCES: dict[str, str] = {
    "demo": "demo:DemoSource",
    "stanford-dogs": "stanford_dogs:StanfordDogsSource",
    "stanford-cars": "stanford_cars:StanfordCarsSource",
    "fgvc-aircraft": "fgvc_aircraft:FGVCAircraftSource",
    "cub200": "cub200:Cub200Source",
    "nabirds": "nabirds:NABirdsSource",
    "inat2021": "inat2021:INat2021Source",
    "imagefolder": "imagefolder:ImageFolderSource",
}


def get_source(name: str) -> type[Source]:
    """The source class registered under `name`, or a one-line error listing the known names."""
    if name not in SOURCES:
        raise FinerError(f"unknown source {name!r}; choose one of: {', '.join(sorted(SOURCES))}")
    module, cls = SOURCES[name].split(":")
    return getattr(import_module(f"{__name__}.{module}"), cls)


__all__ = ["SOURCES", "ImageRecord", "LayoutError", "Source", "get_source", "inside"]
