"""A check shared by the tests of the files finer writes: a record has the keys its type declares."""

from __future__ import annotations

from typing import Any


def declared(record: dict[str, Any], kind: Any) -> None:
    """``record`` holds every required key of the TypedDict ``kind`` (`finer.records`) and no other key
    than those it declares: a key written but not declared (or declared but not written) fails."""
    required, optional = kind.__required_keys__, kind.__optional_keys__
    assert required <= record.keys(), f"{kind.__name__}: missing {sorted(required - record.keys())}"
    assert record.keys() <= required | optional, (
        f"{kind.__name__}: undeclared {sorted(record.keys() - required - optional)}"
    )
