"""`finer ablate` on the demo data with tiny random parts: a 2x2 grid (CLIP / SigLIP x pretraining none /
frozen) plus a broken encoder, its table and chart, shared stages, resuming, and grid-file errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors import safe_open

from finer.cli import main
from finer.data.build import BuildConfig, build
from finer.errors import FinerError
from finer.models.backends import HFBackend
from finer.records import (
    COMPOSE_FILE,
    GRID_RESULTS_FILE,
    CellRecord,
    ComposeRecord,
    GridRecord,
    SourceRecord,
    read_cell_file,
    read_compose_file,
    read_grid_file,
    read_record,
    read_source_file,
)
from finer.run_folder import OutputLock
from finer.testing import tiny_part_path
from finer.train.ablate import CELL_FILE, GRID_FILE, SOURCE_FILE, Cell, _Runner, load_grid, run_grid
from finer.train.sft import RUN_FILE
from tests.cli_helpers import run_cli
from tests.records_check import declared

#: Trains or generates with tiny models: seconds per test (`pytest -m 'not slow'` leaves them out).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo source, one image per species and split: 8 training and 8 test images."""
    out = tmp_path_factory.mktemp("data") / "demo"
    build(BuildConfig(source="demo", out=out, limit_per_class=1))
    return out


def _spec(demo: Path, broken: Path) -> dict[str, Any]:
    """Two encoders and a broken one x one LM x two pretraining policies; one step per training run."""
    steps = {"max_steps": 1, "batch_size": 4, "warmup_ratio": 0.0, "report_to": "none", "logging_steps": 1}
    return {
        "vision": [str(tiny_part_path("clip")), str(tiny_part_path("siglip")), str(broken)],
        "llm": [str(tiny_part_path("llama"))],
        "pretrain": ["none", "frozen"],
        "format": ["direct"],
        "datasets": [str(demo)],
        "pretraining": steps,
        "finetuning": {**steps, "lora_r": 8, "lora_alpha": 16},
        "evaluation": {"limit": 2, "batch_size": 4, "max_new_tokens": 4},
    }


@pytest.fixture(scope="module")
def grid(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    """(grid file, output folder, run_grid's result) of one run of the grid."""
    root = tmp_path_factory.mktemp("ablate")
    broken = root / "broken-encoder"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "bert"}))
    path = root / "grid.yaml"
    path.write_text(yaml.safe_dump(_spec(demo, broken)))
    out = root / "out"
    return path, out, run_grid(load_grid(path, out))


def test_a_two_by_two_grid_completes_and_writes_its_table_and_chart(
    grid: tuple[Path, Path, dict[str, Any]],
) -> None:
    _, out, result = grid
    done = [r for r in result["cells"] if r["status"] == "done"]
    assert len(result["cells"]) == 6 and len(done) == 4
    assert {(r["vision"].endswith("clip"), r["pretrain"]) for r in done} == {
        (True, "none"), (True, "frozen"), (False, "none"), (False, "frozen"),
    }  # fmt: skip
    for record in done:
        assert (
            set(record["scores"]) == {"coarse", "fine"}
            and record["images"] == 2
            and record["mode"] == "direct"
        )
        assert all(0 <= score <= 1 for score in record["scores"].values())
        cell = out / "cells" / record["name"]
        assert (cell / "finetune" / RUN_FILE).is_file() and (cell / "eval" / "predictions.jsonl").is_file()
    table = (out / "results.md").read_text()
    assert table.count("| part-llama |") == 6 and "| fine − coarse |" in table
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["status"] for row in rows].count("done") == 4 and {"coarse", "fine"} <= set(rows[0])
    assert read_record(out / GRID_RESULTS_FILE, list[CellRecord], "") == result["cells"]
    for record in result["cells"]:  # cell.json holds the record, as `finer.records` declares it
        declared(record, CellRecord)
        assert read_cell_file(out / "cells" / record["name"]) == record
    declared(read_grid_file(out), GridRecord)
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cells_share_their_composed_and_pretrained_models(grid: tuple[Path, Path, dict[str, Any]]) -> None:
    """One composition per encoder x LLM, one pretraining per policy; frozen pretraining saves the projector
    alone."""
    path, out, _ = grid
    assert sorted(p.name for p in (out / "models").iterdir()) == [
        "part-clip__part-llama",
        "part-siglip__part-llama",
    ]
    spec = yaml.safe_load(path.read_text())
    for vision in spec["vision"][:2]:  # what each model was composed from, as `finer.records` declares it
        composed = read_compose_file(out / "models" / f"{Path(vision).name}__part-llama")
        declared(composed, ComposeRecord)
        assert (composed["vision"], composed["llm"]) == (vision, spec["llm"][0])
    pretrained = sorted((out / "pretrained").iterdir())
    assert [p.name for p in pretrained] == [
        "part-clip__part-llama__frozen",
        "part-siglip__part-llama__frozen",
    ]
    for folder in pretrained:
        assert (folder / "model" / "config.json").is_file()
        with safe_open(folder / "adapter" / "adapter_model.safetensors", "pt") as fh:
            keys = list(fh.keys())
        assert keys and all(".multi_modal_projector." in key for key in keys)


def test_a_broken_cell_is_reported_and_the_others_finish(grid: tuple[Path, Path, dict[str, Any]]) -> None:
    _, out, result = grid
    failed = [r for r in result["cells"] if r["status"] != "done"]
    assert result["failed"] == 2 and [r["pretrain"] for r in failed] == ["none", "frozen"]
    for record in failed:
        assert record["stage"] == "compose" and "'bert' is not a supported encoder" in record["error"]
        assert "Traceback" in (out / "cells" / record["name"] / "error.log").read_text()
    assert (out / "results.md").read_text().count("failed at compose: ") == 2


def test_a_second_run_skips_finished_cells_and_retries_failed_ones(
    grid: tuple[Path, Path, dict[str, Any]], capsys: pytest.CaptureFixture
) -> None:
    path, out, result = grid
    finished = {
        r["name"]: (out / "cells" / r["name"] / CELL_FILE).stat().st_mtime_ns for r in result["cells"]
    }
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["ablate", str(path), "--out", str(out)])
    captured = capsys.readouterr()
    assert exit_info.value.code == 1 and "2 of 6 cells failed" in captured.err
    assert "| part-clip | part-llama | frozen | direct |" in captured.out
    for record in result["cells"]:
        stamp = (out / "cells" / record["name"] / CELL_FILE).stat().st_mtime_ns
        assert (stamp == finished[record["name"]]) == (record["status"] == "done")


def test_a_grid_folder_refuses_other_shared_settings(grid: tuple[Path, Path, dict[str, Any]]) -> None:
    path, out, _ = grid
    spec = yaml.safe_load(path.read_text())
    spec["evaluation"]["limit"] = 3
    other = path.with_name("other.yaml")
    other.write_text(yaml.safe_dump(spec))
    with pytest.raises(FinerError, match="holds a grid run with other evaluation"):
        run_grid(load_grid(other, out))
    assert json.loads((out / GRID_FILE).read_text())["evaluation"]["limit"] == 2


@pytest.mark.parametrize(
    ("axis", "index", "refused"),
    [
        ("llm", 0, "models"),  # the composed model
        ("vision", 0, "models"),
        ("vision", 2, "cells"),  # the broken encoder composed nothing: its failed cells
    ],
)
def test_a_grid_folder_refuses_models_of_the_same_name_from_elsewhere(
    grid: tuple[Path, Path, dict[str, Any]], axis: str, index: int, refused: str, tmp_path: Path
) -> None:
    """`openai/x` and `me/x` share a folder name: a later run may not reuse what the other one made."""
    path, out, _ = grid
    spec = yaml.safe_load(path.read_text())
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}
    elsewhere = str(tmp_path / "elsewhere" / Path(spec[axis][index]).name)
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**spec, axis: [elsewhere]}))
    with pytest.raises(FinerError) as info:
        run_grid(load_grid(other, out))
    made = {"vision": spec["vision"][0], "llm": spec["llm"][0], axis: spec[axis][index]}
    wanted = {**made, axis: elsewhere}
    message = str(info.value)
    assert message.startswith(str(out / refused)) and "\n" not in message
    assert (
        f"made from vision {made['vision']} + llm {made['llm']}, not {wanted['vision']} + {wanted['llm']}"
        in message
    )
    assert "choose another --out" in message
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.json")} == stamps  # nothing ran


def test_a_pretraining_records_its_models_and_is_not_reused_for_others(
    grid: tuple[Path, Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, out, _ = grid
    spec = yaml.safe_load(path.read_text())
    name = "part-clip__part-llama__frozen"
    source = read_source_file(out / "pretrained" / name)
    declared(source, SourceRecord)
    assert source == {"vision": spec["vision"][0], "llm": spec["llm"][0], "pretrain": "frozen"}
    # A folder holding that pretraining alone (its composed model deleted), made with another LLM.
    copy = tmp_path / "out"
    (copy / "pretrained" / name).mkdir(parents=True)
    (copy / GRID_FILE).write_text((out / GRID_FILE).read_text())
    (copy / "pretrained" / name / SOURCE_FILE).write_text(json.dumps({**source, "llm": "me/part-llama"}))
    with pytest.raises(
        FinerError, match=rf"pretrained/{name} was made from vision .* \+ llm me/part-llama, not"
    ):
        run_grid(load_grid(path, copy))
    assert sorted(p.name for p in copy.iterdir()) == [GRID_FILE, "pretrained"]


def test_a_finer_cell_asks_each_group_question_once_and_direct_asks_two_levels(
    grid: tuple[Path, Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mode finer's coarse and fine tasks share their first (group) question when asked in one run; the
    direct cells ask coarse and fine only, never the superordinate the table does not show."""
    path, out, result = grid
    done = next(r for r in result["cells"] if r["status"] == "done" and r["pretrain"] == "none")
    predictions = (out / "cells" / done["name"] / "eval" / "predictions.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["level"] for line in predictions) == ["coarse", "coarse", "fine", "fine"]
    firsts: list[list[dict]] = []
    generate = HFBackend.generate

    def spy(self: HFBackend, conversations: list[list[dict]], images: list) -> list:
        firsts.extend(c for c in conversations if len(c) == 1)
        return generate(self, conversations, images)

    monkeypatch.setattr(HFBackend, "generate", spy)
    cell = Cell(
        done["vision"], done["llm"], "none", "finer"
    )  # the direct cell's adapter, asked in finer mode
    finetune = out / "cells" / done["name"] / "finetune"
    scores = _Runner(load_grid(path, out), out).evaluate(
        cell, str(out / "models" / cell.pair), str(finetune), tmp_path / "eval"
    )
    assert scores["mode"] == "finer" and set(scores["scores"]) == {"coarse", "fine"} and scores["images"] == 2
    assert len(firsts) == 2  # one group question per image, its answer shared by both levels


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "red"}, "unknown key 'colour'"),
        ({"vision": []}, "`vision` is empty"),
        ({"pretrain": ["half"]}, "pretrain must be a list of"),
        ({"finetuning": {"model": "x"}}, "`finetuning` may not set model"),
        ({"pretraining": {"train_llm": "full"}}, "`pretraining` may not set train_llm"),
        ({"finetuning": {"lora_r": "big"}}, "lora_r must be int"),
        ({"evaluation": {"mode": "choice"}}, "`evaluation` has unknown key(s) mode"),
        ({"compose": {"dtype": 16}}, "dtype must be str"),
        ({"compose": {"dtype": "bf16"}}, "`compose` dtype 'bf16': choose one of auto, bfloat16, float16"),
        ({"llm": ["a/tiny", "b/tiny"]}, "two `llm` entries share a folder name"),
    ],
)
def test_bad_grid_files_fail_in_one_line(change: dict[str, Any], message: str, tmp_path: Path) -> None:
    spec = {"vision": ["openai/clip"], "llm": ["lmsys/vicuna"], "datasets": ["data/demo"], **change}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(FinerError) as info:
        load_grid(path, tmp_path / "out")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_grid_needs_an_output_folder(tmp_path: Path) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"vision": ["v"], "llm": ["l"], "datasets": ["d"]}))
    with pytest.raises(FinerError, match="no output folder; pass --out DIR"):
        load_grid(path)
    assert load_grid(path, tmp_path / "out").out == str(tmp_path / "out")


def test_a_second_grid_into_the_same_folder_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"vision": ["v"], "llm": ["l"], "datasets": ["d"]}))
    out = tmp_path / "out"
    with OutputLock(out), pytest.raises(FinerError, match="being written by another run"):
        run_grid(load_grid(path, out))
    assert not out.exists()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"vision": "v", "llm": ', "not valid JSON"),
        (
            json.dumps({"vision": "v", "llm": "l", "pretrain": "frozen", "format": "direct"}),
            "lacks `name`, `status`",
        ),
    ],
)
def test_a_damaged_cell_file_is_one_line_naming_it_and_the_fix(
    text: str, problem: str, tmp_path: Path
) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"vision": ["v"], "llm": ["l"], "datasets": ["d"]}))
    grid = load_grid(path, tmp_path / "out")
    folder = tmp_path / "out" / "cells" / grid.cells()[0].name
    folder.mkdir(parents=True)
    (tmp_path / "out" / GRID_FILE).write_text(json.dumps(grid.settings()))
    (folder / CELL_FILE).write_text(text)
    with pytest.raises(FinerError) as info:
        run_grid(grid)
    message = str(info.value)
    assert message.startswith(f"{folder / CELL_FILE}: {problem}") and "\n" not in message
    assert message.endswith(f"; delete {folder} to run the cell again")
    assert sorted(p.name for p in folder.iterdir()) == [CELL_FILE]  # nothing ran


def _damaged_grid_folder(tmp_path: Path) -> tuple[Path, Path]:
    """(grid file, its output folder) holding this grid's grid.json, before any cell ran."""
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"vision": ["v"], "llm": ["l"], "datasets": ["d"]}))
    out = tmp_path / "out"
    out.mkdir()
    (out / GRID_FILE).write_text(json.dumps(load_grid(path, out).settings()))
    return path, out


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"datasets": ["d"], ', "not valid JSON"),
        ('{"datasets": ["d"]}', "lacks `pretrain_datasets`, `compose`"),
    ],
)
def test_a_damaged_grid_file_is_one_line_naming_it_and_the_fix(
    text: str, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grid, out = _damaged_grid_folder(tmp_path)
    (out / GRID_FILE).write_text(text)
    code, _, err = run_cli(["ablate", str(grid), "--out", str(out)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: {out / GRID_FILE}: {problem}")
    assert lines[0].endswith(f"; choose another --out (or delete {out} to start over)")
    assert sorted(p.name for p in out.iterdir()) == [GRID_FILE]  # nothing ran


@pytest.mark.parametrize(
    ("where", "name", "fix"),
    [
        ("models/v__l", COMPOSE_FILE, "compose it again"),
        ("pretrained/v__l__frozen", SOURCE_FILE, "pretrain it again"),
    ],
)
@pytest.mark.parametrize(
    ("text", "problem"), [('{"vision": "v", ', "not valid JSON"), ('{"vision": "v"}', "lacks `llm`")]
)
def test_a_damaged_compose_or_source_file_is_one_line_naming_it_and_the_fix(
    where: str,
    name: str,
    fix: str,
    text: str,
    problem: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A folder a cell would reuse, whose record of the models it was made from is damaged."""
    grid, out = _damaged_grid_folder(tmp_path)
    folder = out / where
    folder.mkdir(parents=True)
    (folder / name).write_text(text)
    code, _, err = run_cli(["ablate", str(grid), "--out", str(out)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: {folder / name}: {problem}")
    assert lines[0].endswith(f"; delete {folder} to {fix}")
    assert sorted(p.name for p in out.iterdir()) == sorted([GRID_FILE, where.split("/")[0]])  # nothing ran
