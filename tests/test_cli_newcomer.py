"""A newcomer's first hour (issue 17): fast one-line failures, complete help, and the demo's helpers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer.main

from finer.cli import app

#: A mistake must be told in seconds: before torch and transformers load (they took 30-50 s here).
FAST_S = 15
#: Runs `finer` and then says on stdout whether torch was imported.
_RUN_AND_REPORT = """
import sys
from finer.cli import main
try:
    main(sys.argv[1:])
finally:
    print("torch loaded:", "torch" in sys.modules)
"""


def _finer(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`finer ARGS` in a fresh interpreter, offline, killed after FAST_S seconds."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    return subprocess.run(
        [sys.executable, "-c", _RUN_AND_REPORT, *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=FAST_S,
    )


def _one_error_line(result: subprocess.CompletedProcess[str], message: str) -> None:
    """Exit 2 with one line naming the problem, told before torch was imported."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "torch loaded: False" in result.stdout


@pytest.mark.parametrize("command", ["finetune", "grpo"])
def test_bare_training_command_says_no_output_folder_in_seconds(command: str, tmp_path: Path) -> None:
    _one_error_line(_finer([command], tmp_path), "no output folder: pass --out DIR")


def test_grpo_unknown_local_family_is_one_line_in_seconds(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    args = ["grpo", "--out", "o", "--model", "m", "--dataset", "d"]
    _one_error_line(_finer(args, tmp_path), "model_type 'bert', which is not in finer's family registry")


def test_uncached_hub_id_offline_is_one_line_in_seconds(tmp_path: Path) -> None:
    args = ["finetune", "--output-dir", "o", "--model", "nobody/no-such-model", "--dataset", "d"]
    _one_error_line(_finer(args, tmp_path), "not in the Hugging Face cache, and HF_HUB_OFFLINE is set")
    assert not (tmp_path / "o").exists()


def test_unknown_local_family_is_one_line_in_seconds(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    args = ["finetune", "--output-dir", "o", "--model", "m", "--dataset", "d"]
    _one_error_line(_finer(args, tmp_path), "model_type 'bert', which is not in finer's family registry")


def test_no_network_is_told_without_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Online mode but no route to the Hub: one probe, then the same one line (not a minute of retries)."""
    from finer.errors import FinerError
    from finer.models import hub_access

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")  # refused at once
    hub_access.hub_reachable.cache_clear()
    try:
        with pytest.raises(FinerError, match=r"the Hub is not reachable \(no network\?\)"):
            hub_access.require_obtainable("nobody/no-such-model")
    finally:
        hub_access.hub_reachable.cache_clear()


def _commands() -> dict[str, click.Command]:
    return typer.main.get_command(app).commands  # type: ignore[attr-defined]


def test_every_option_of_every_command_has_a_description() -> None:
    missing = [f"{name} {p.name}" for name, cmd in _commands().items() for p in cmd.params if not p.help]
    assert not missing


@pytest.mark.parametrize("command", ["finetune", "grpo"])
def test_recipe_options_show_their_default_as_from_the_recipe(command: str) -> None:
    """Their `None` means "the recipe's value, else the config's": help says so instead of nothing."""
    silent = [
        p.name
        for p in _commands()[command].params
        if p.default is None and p.name not in {"config", "set_", "push_to_hub"} and not p.show_default
    ]
    assert not silent
    needed = {p.name: p.help for p in _commands()[command].params if p.name in {"model", "output_dir"}}
    assert all("Required, here or in the recipe" in text for text in needed.values())


def test_build_help_lists_every_source_and_whole_option_names(tmp_path: Path) -> None:
    from finer.builders import SOURCES

    source = next(p for p in _commands()["build"].params if p.name == "source")
    assert all(name in source.help for name in SOURCES)
    environment = {k: v for k, v in os.environ.items() if k not in {"COLUMNS", "TERMINAL_WIDTH"}}
    result = subprocess.run(
        [sys.executable, "-c", "from finer.cli import main; main()", "build", "--help"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "--limit-per-class " in result.stdout and "…" not in result.stdout


def test_make_shell_puts_the_environment_first() -> None:
    """The README's bare `finer` and `python` lines work in `make shell` (the venv's, not the system's)."""
    root = Path(__file__).resolve().parents[1]
    venv = Path(sys.prefix)
    if not (venv / ".installed").is_file() or shutil.which("make") is None or shutil.which("bash") is None:
        pytest.skip("needs make, bash and the Makefile's .venv")
    result = subprocess.run(
        ["make", "--no-print-directory", "shell", f"VENV={venv}"],
        cwd=root,
        input='command -v finer; python -c "import sys, torch; print(sys.prefix)"\n',
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert f"{venv}/bin/finer" in result.stdout and f"\n{venv}\n" in f"\n{result.stdout}", result.stdout
    assert "source .venv/bin/activate" in (root / "README.md").read_text(encoding="utf-8")


def _image(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (20, 120, 200)).save(path)


def _build_imagefolder(
    root: Path, out: Path, *extra: str, knowledge: str = "--no-knowledge"
) -> dict[str, int]:
    from finer.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["build", "imagefolder", "--root", str(root), "--out", str(out), knowledge, *extra])
    assert exit_info.value.code in (0, None)
    return json.loads((out / "build.json").read_text())["counts"]


def test_imagefolder_reads_split_folders_and_the_flat_torchvision_layout(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("test", 1)):
        for owl in ("snowy_owl", "barn_owl"):
            for i in range(n):
                _image(tmp_path / "split" / split / owl / f"{i}.jpg")
    assert _build_imagefolder(tmp_path / "split", tmp_path / "a") == {"train": 6, "test": 2}
    for owl in ("snowy_owl", "barn_owl"):
        for i in range(10):
            _image(tmp_path / "flat" / owl / f"{i}.jpg")
    assert _build_imagefolder(tmp_path / "flat", tmp_path / "b") == {"train": 16, "test": 4}
    counts = _build_imagefolder(tmp_path / "flat", tmp_path / "c", "--test-fraction", "0.5")
    assert counts == {"train": 10, "test": 10}
    import datasets

    first = datasets.load_from_disk(str(tmp_path / "b"))["test"]["image_id"]
    _build_imagefolder(tmp_path / "flat", tmp_path / "d")
    again = datasets.load_from_disk(str(tmp_path / "d"))
    assert again["test"]["image_id"] == first  # the seed is fixed: the same folder splits the same way
    assert not set(first) & set(again["train"]["image_id"])


def test_test_fraction_is_refused_where_splits_are_official(tmp_path: Path) -> None:
    from finer.data.build import BuildConfig, build
    from finer.errors import FinerError

    with pytest.raises(FinerError, match="--test-fraction: demo has official splits"):
        build(BuildConfig("demo", tmp_path / "o", test_fraction=0.3))


def test_training_hides_only_the_is_gradient_checkpointing_deprecation() -> None:
    """PEFT and TRL call the deprecated property: that FutureWarning is hidden, a like-named one is not."""
    code = (
        "import warnings\n"
        "warnings.simplefilter('error')\n"
        "import finer.train\n"
        "warnings.warn('`is_gradient_checkpointing` is deprecated, use ...', FutureWarning)\n"
        "try:\n"
        "    warnings.warn('`gradient_checkpointing` is deprecated, use ...', FutureWarning)\n"
        "except FutureWarning:\n"
        "    print('still raised')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "still raised", result.stderr


@pytest.mark.parametrize("checkpointing", [True, False])
def test_trainer_arguments_use_no_deprecated_name(checkpointing: bool, tmp_path: Path) -> None:
    """Our TrainingArguments pass `activation_checkpointing` (transformers 5), so TRL configs warn nothing."""
    import warnings

    from trl import GRPOConfig, SFTConfig

    from finer.train.runtime import trainer_arguments
    from finer.train.sft import FinetuneConfig

    config = FinetuneConfig(gradient_checkpointing=checkpointing, report_to="none")
    for kind in (SFTConfig, GRPOConfig):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            args = kind(**trainer_arguments(config, tmp_path))
        assert args.activation_checkpointing is checkpointing and args.gradient_checkpointing is checkpointing


@pytest.fixture(scope="module")
def demo_rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo dataset (embedded images with boxes), two images per class."""
    from finer.data.build import BuildConfig, build

    out = tmp_path_factory.mktemp("demo") / "demo"
    build(BuildConfig("demo", out, limit_per_class=2))
    return out


def test_predict_input_crops_a_dataset_row_to_its_box_or_a_file_to_box(
    demo_rows: Path, tmp_path: Path
) -> None:
    import datasets

    from finer.errors import FinerError
    from finer.eval.predict import predict_input
    from finer.models.images import crop_box

    row = datasets.load_from_disk(str(demo_rows))["test"][1]
    picture, known = predict_input(None, str(demo_rows), 1, crop_to_bbox=True)
    expected = crop_box(row["image"].convert("RGB"), row["bbox"])
    assert picture.size == expected.size and picture.tobytes() == expected.tobytes()
    assert known["fine"] == row["fine"] and known["superordinate"] == "Bird"
    whole, _ = predict_input(None, str(demo_rows), 1)
    assert whole.size == row["image"].size
    file = tmp_path / "bird.png"
    row["image"].save(file)
    cropped, _ = predict_input(file, None, None, box="10,20,30,40")
    assert cropped.size == (30, 40)
    for kwargs, message in [
        ({"crop_to_bbox": True}, "needs its box: --box X,Y,W,H"),
        ({"box": "0,0,500,10"}, "does not lie inside"),
        ({"box": "1,2,3"}, "expected X,Y,W,H"),
    ]:
        with pytest.raises(FinerError, match=message):
            predict_input(file, None, None, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(FinerError, match="IMAGE, or --dataset DIR with --index I"):
        predict_input(file, str(demo_rows), 0)


@pytest.mark.slow
def test_predict_asks_a_dataset_row_cropped_as_the_demo_adapter_was_trained(
    demo_rows: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from finer.cli import main
    from finer.testing import build_tiny_vlm

    build_tiny_vlm("llava", tmp_path / "tiny")
    args = ["predict", "--model", str(tmp_path / "tiny"), "--dataset", str(demo_rows), "--index", "0"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--crop-to-bbox", "--mode", "finer", "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert exit_info.value.code in (0, None), captured.err
    assert captured.out.startswith("group: ") and ": gold " in captured.err  # the row's superordinate asked


def _owls(root: Path) -> Path:
    for owl in ("snowy_owl", "barn_owl"):
        for i in range(3):
            _image(root / owl / f"{i}.jpg")
    return root


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def test_knowledge_file_gives_attributes_offline_for_format_finer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No endpoint and no Wikipedia (the mirror given refuses): your own text per concept is enough."""
    import datasets

    from finer.train.data import attribute_column

    _offline(monkeypatch)
    texts = tmp_path / "concepts.jsonl"
    texts.write_text(
        json.dumps({"fine": "snowy owl", "text": "The snowy owl has white plumage and yellow eyes."})
        + "\n"
        + json.dumps(
            {"fine": "Barn_Owl", "text": "The barn owl has a heart-shaped white face and dark eyes."}
        )
        + "\n"
    )
    refused = ("--wiki-api", "http://127.0.0.1:9/w/api.php")
    args = ["--knowledge-file", str(texts), *refused]
    counts = _build_imagefolder(_owls(tmp_path / "owls"), tmp_path / "out", *args, knowledge="--knowledge")
    assert counts == {"train": 4, "test": 2}
    rows = datasets.load_from_disk(str(tmp_path / "out"))["train"]
    assert attribute_column(rows, "auto") == "attributes_required"
    assert {tuple(a) for a in rows["attributes_required"]} >= {("white plumage", "yellow eyes")}
    texts.write_text(json.dumps({"fine": "tawny owl", "text": "Brown."}) + "\n")
    from finer.data.knowledge import read_knowledge_file
    from finer.errors import FinerError
    from finer.schema import Concept

    with pytest.raises(FinerError, match="line 1: 'tawny owl' is no concept of this dataset"):
        read_knowledge_file(texts, [Concept("snowy_owl", ["snowy owl"], "Bird")])


def test_offline_advice_does_not_go_in_a_circle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without attributes, --format finer names every way to get them, the offline ones included; the
    Wikipedia failure offers the knowledge file; `ground` offers its own offline path, not build's."""
    import datasets

    from finer.cli import main
    from finer.errors import FinerError
    from finer.train.data import attribute_column

    _offline(monkeypatch)
    _build_imagefolder(_owls(tmp_path / "owls"), tmp_path / "bare")
    with pytest.raises(FinerError, match=r"--knowledge-file concepts.jsonl, offline") as err:
        attribute_column(datasets.load_from_disk(str(tmp_path / "bare"))["train"], "auto")
    assert "--extractor cub-annotations" in str(err.value) and "--base-url" in str(err.value)
    refused = ["--wiki-api", "http://127.0.0.1:9/w/api.php"]
    with pytest.raises(SystemExit):
        main(
            ["build", "imagefolder", "--root", str(tmp_path / "owls"), "--out", str(tmp_path / "o"), *refused]
        )
    assert "--knowledge-file concepts.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ground", str(tmp_path / "bare"), "--out", str(tmp_path / "g"), "--model", "m"])
    err_line = capsys.readouterr().err
    assert "--backend hf --model" in err_line and "--extractor" not in err_line


def test_range_checks_read_every_key_and_an_empty_recipe() -> None:
    """An empty mapping (no recipe) is no error, and a bad value is caught wherever it sits in its mapping."""
    from finer.errors import FinerError
    from finer.train.sft import FinetuneConfig

    assert FinetuneConfig.from_sources({}, {"seed": 3}).seed == 3
    with pytest.raises(FinerError, match="recipe: max_steps must be"):
        FinetuneConfig.from_sources({"max_steps": 0, "seed": 1}, origin=("recipe",))
