"""A check shared by the tests of the files finer writes: a record has the keys its type declares."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def declared(record: dict[str, Any], kind: Any) -> None:
    """``record`` holds every required key of the TypedDict ``kind`` (`finer.records`) and no other key
    than those it declares: a key written but not declared (or declared but not written) fails."""
    required, optional = kind.__required_keys__, kind.__optional_keys__
    assert required <= record.keys(), f"{kind.__name__}: missing {sorted(required - record.keys())}"
    assert record.keys() <= required | optional, (
        f"{kind.__name__}: undeclared {sorted(record.keys() - required - optional)}"
    )


def checked_predictions(out: Path) -> list[dict[str, Any]]:
    """The lines of ``out``'s predictions file, each checked against the declared record."""
    from finer.records import EvalRun, PredictionRecord

    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    for line in lines:
        declared(line, PredictionRecord)
        declared(line["run"], EvalRun)
    return lines
