"""Reading a built dataset back (`finer.data.datasets_io`), as `finer eval`, `finer ground` and the trainers
do:
a folder, a Hub repo id (through a stand-in for `datasets.load_dataset`), its concepts, one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import datasets
import pytest

from finer.data.datasets_io import load_built, load_concepts, pick_split
from finer.errors import FinerError
from finer.eval.engine import load_split as eval_split
from finer.train.data import load_split as train_split

ROWS = {
    "image_id": ["1", "2"],
    "superordinate": ["Bird", "Bird"],
    "coarse": [["Wren"], ["Gull"]],
    "fine": [["Bewick's Wren"], ["Western Gull"]],
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    out = tmp_path / "built"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(ROWS)}).save_to_disk(str(out))
    return out


def test_a_folder_and_its_concepts_file(folder: Path) -> None:
    rows, concepts = eval_split(str(folder), "test", ["fine"])
    assert rows["image_id"] == ["1", "2"]  # no concepts.jsonl: the concepts are the split's own rows
    own = [{"superordinate": "Bird", "coarse": ["Wren"], "fine": ["Bewick's Wren"]}]
    assert concepts == [*own, {"superordinate": "Bird", "coarse": ["Gull"], "fine": ["Western Gull"]}]
    concept = {"concept_id": "c1", "fine": ["Cactus Wren"], "superordinate": "Bird", "coarse": ["Wren"]}
    (folder / "concepts.jsonl").write_text(json.dumps(concept) + "\n")
    _, concepts = eval_split(str(folder), "test", ["fine"])
    assert concepts == [{"superordinate": "Bird", "coarse": ["Wren"], "fine": ["Cactus Wren"]}]


def test_one_line_errors_name_the_option(folder: Path, tmp_path: Path) -> None:
    missing, built = str(tmp_path / "missing"), str(folder)
    for call, expected in [
        (lambda: eval_split(missing, "test", []), f"cannot load --dataset {missing}: no such folder"),
        (lambda: load_built(missing, "DATASET"), f"cannot load DATASET {missing}: no such folder"),
        (lambda: train_split(missing, "train"), f"cannot load dataset {missing}: no such folder"),
        (lambda: eval_split(built, "train", []), f"--dataset {built} has no split 'train'; available: test"),
        (lambda: train_split(built, "train"), f"dataset {built} has no split 'train'; available: test"),
        (lambda: eval_split(built, "test", ["label"]), f"--dataset {built} split 'test' lacks column(s)"),
    ]:
        with pytest.raises(FinerError, match="^" + re.escape(expected)):
            call()


def test_a_lone_split_is_for_the_trainers_only(tmp_path: Path) -> None:
    lone = tmp_path / "lone"
    datasets.Dataset.from_dict(ROWS).save_to_disk(str(lone))
    assert train_split(str(lone), "train")["image_id"] == ["1", "2"]
    with pytest.raises(FinerError, match="holds one split without a name; save a DatasetDict"):
        eval_split(str(lone), "test", [])


def test_a_hub_repo_id_and_its_concepts_config(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []
    concepts = {"concept_id": ["c1"], "superordinate": ["Bird"], "coarse": [["Wren"]], "fine": [["Wren"]]}

    def load_dataset(repo: str, config: str | None = None, split: str | None = None) -> Any:
        calls.append((repo, config, split))
        if repo != "me/built":
            raise datasets.exceptions.DatasetNotFoundError(f"Dataset '{repo}' doesn't exist on the Hub")
        if config == "concepts":
            return datasets.Dataset.from_dict(concepts)
        built = datasets.DatasetDict({"test": datasets.Dataset.from_dict(ROWS)})
        return built if split is None else built[split]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    rows, found = eval_split("me/built", "test", ["fine"])
    assert rows.num_rows == 2 and found == [{"superordinate": "Bird", "coarse": ["Wren"], "fine": ["Wren"]}]
    assert calls == [("me/built", None, "test"), ("me/built", "concepts", "train")]  # the asked split only
    assert pick_split(load_built("me/built", "DATASET"), "test", "DATASET", "me/built").num_rows == 2
    assert load_concepts("me/other", ["fine"]) is None  # no concepts config: the caller falls back
    with pytest.raises(FinerError, match=r"^cannot load --dataset me/gone \(Dataset 'me/gone' doesn't exist"):
        eval_split("me/gone", "test", [])
