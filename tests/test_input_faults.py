"""Bad input told in one line (issue 16 item 14): out-of-range training settings however they arrive,
duplicate or non-UTF-8 list files, hidden class folders, and a full disk."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from finer.builders.base import LayoutError
from finer.builders.cub200 import Cub200Source
from finer.builders.imagefolder import ImageFolderSource
from finer.cli import main
from finer.data.build import BuildConfig, build
from finer.train.config import TrainerConfig
from finer.train.grpo import GrpoConfig
from finer.train.sft import FinetuneConfig
from tests.layouts import jpeg, write_cub


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ("max_steps=0", "max_steps must be an integer >= 1, or absent to train for epochs, not 0"),
        ("batch_size=0", "batch_size must be an integer >= 1, not 0"),
        ("learning_rate=-1", "learning_rate must be a number > 0, not -1.0"),
        ("lora_r=-5", "lora_r must be an integer >= 1, not -5"),
        ("lora_dropout=1", "lora_dropout must be a number from 0 up to (not including) 1, not 1.0"),
    ],
)
def test_set_is_range_checked_in_one_line(
    setting: str, words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--set` skips Typer's option checks: the config itself refuses the value, before anything loads."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--config", "demo-tiny", "--output-dir", str(out), "--set", setting])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: command line: {words}"
    assert not out.exists()


def test_recipe_and_direct_configs_are_range_checked() -> None:
    """A recipe names itself as the origin; a config built in code is checked by the dataclass."""
    with pytest.raises(Exception, match=r"^recipe r\.yaml: save_steps must be an integer >= 1, not 0$"):
        FinetuneConfig.from_sources({"save_steps": 0}, origin=("recipe r.yaml",))
    with pytest.raises(Exception, match=r"^epochs must be a number > 0, not 0$"):
        GrpoConfig(epochs=0)
    assert TrainerConfig(max_steps=None).max_steps is None  # absent: train for epochs
    assert FinetuneConfig.from_sources({"max_steps": 1, "lora_dropout": 0}).max_steps == 1


def _cub_line_twice(root: Path) -> Path:
    cub = write_cub(root)
    images = cub / "images.txt"
    images.write_text(images.read_text() + images.read_text().splitlines()[0] + "\n")
    return images


def test_duplicate_image_id_is_refused(tmp_path: Path) -> None:
    images = _cub_line_twice(tmp_path)
    with pytest.raises(LayoutError, match=r"images\.txt:10: id 1 is listed again \(first on line 1\)"):
        list(Cub200Source(tmp_path).records("train"))
    assert images.exists()


def test_non_utf8_list_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cub = write_cub(tmp_path)
    latin1 = "1 001.Black_footed_Albatross\n2 002.Laysan_Ålbatross\n".encode("latin1")
    (cub / "classes.txt").write_bytes(latin1)
    with pytest.raises(SystemExit) as exit_info:
        main(["build", "cub200", "--root", str(tmp_path), "--out", str(tmp_path / "out"), "--no-knowledge"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "classes.txt: not UTF-8 text (byte 0xc5" in err and "re-save it as UTF-8" in err


def test_hidden_class_folder_is_counted_and_named(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for folder in ("owl", "hawk", "..x"):
            jpeg(tmp_path / "src" / split / folder / "a.jpg")
    source = ImageFolderSource(tmp_path / "src")
    assert sorted(c.concept_id for c in source.concepts()) == ["hawk", "owl"]
    config = BuildConfig(source="imagefolder", root=tmp_path / "src", out=tmp_path / "out", knowledge=False)
    summary = build(config)
    note = "imagefolder: skipped 2 folder(s) whose name starts with '.' or '__' (test/..x, train/..x)"
    assert any(w.startswith(note) for w in summary["warnings"]), summary["warnings"]
    written = json.loads((tmp_path / "out" / "build.json").read_text())
    assert summary["warnings"] == written["warnings"]


def test_full_disk_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """ENOSPC while writing the dataset: the folder and the fix, exit 2, no traceback."""
    import finer.data.build as build_module

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(build_module, "_write_rows", full)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["build", "demo", "--out", str(out), "--limit-per-class", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err  # above the line: the progress bar only
    assert err.splitlines()[-1] == f"error: no space left writing {out}: free space or choose another --out"


def test_other_os_errors_still_raise(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import finer.data.build as build_module

    def denied(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(build_module, "_write_rows", denied)
    with pytest.raises(OSError, match="Input/output error"):
        main(["build", "demo", "--out", str(tmp_path / "out"), "--limit-per-class", "1"])
