"""`finer eval` never answers from the wrong run and never dies on one image: the run identity holds the
model's, adapter's and dataset's content; unreadable images are skipped, recorded and counted by both real
backends; replies are stored capped; empty answers are counted. Only the far end of the wire is fake."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from finer.data.build import BuildConfig, build
from finer.errors import FinerError
from finer.eval.engine import MAX_STORED_CHARS, EvalConfig, evaluate
from finer.eval.report import read_predictions
from finer.models import fingerprint as fingerprint_module
from finer.models.backends import Generation
from finer.models.fingerprint import weights_fingerprint
from finer.testing import tiny_vlm_path
from finer.testing.fake_openai import FakeOpenAI
from tests.cli_helpers import run_cli
from tests.records_check import checked_predictions


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "demo"
    build(BuildConfig(source="demo", out=out, splits=["test"], limit_per_class=1))
    return out


@pytest.fixture(autouse=True)
def _no_endpoint_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


class Echo:
    """A backend that answers every question with the same text (the wire is not what is tested here)."""

    def __init__(self, text: str = "Answer: Bird") -> None:
        self.text = text
        self.asked = 0

    def run(self, tasks: Any, sink: Any) -> None:
        for task in tasks:
            self.asked += 1
            sink.done(task, [Generation(self.text)])


def save_adapter(folder: Path, seed: int) -> None:
    """An adapter-shaped folder: a config and LoRA weights drawn from ``seed`` (same shapes every seed)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text('{"base_model_name_or_path": "m", "r": 4}')
    generator = torch.Generator().manual_seed(seed)
    save_file({"lora_A": torch.randn(4, 64, generator=generator)}, str(folder / "adapter_model.safetensors"))


# --- run identity ----------------------------------------------------------------------------------


def test_retrained_adapter_at_the_same_path_is_asked_again(demo: Path, tmp_path: Path) -> None:
    """make finetune with another seed writes the same path: its answers must not come from the old run."""
    adapter, out = tmp_path / "adapter", tmp_path / "eval"
    save_adapter(adapter, seed=0)
    config = EvalConfig(dataset=str(demo), out=out, model="m", adapter=str(adapter), level="fine")
    first = evaluate(config, backend=Echo())
    again = evaluate(config, backend=Echo())
    assert first["asked"] == 8 and again["asked"] == 0  # same everything: resumed, nothing asked
    save_adapter(adapter, seed=1)  # retrained: same file names, shapes and sizes, other weights
    retrained = evaluate(config, backend=Echo("Answer: Owl"))
    assert retrained["asked"] == 8
    assert any("the adapter at" in w and "changed" in w for w in retrained["warnings"])
    runs = {run["label"]: run for run in retrained["runs"]}
    assert len(runs) == 2 and retrained["current"] in runs
    fingerprints = {r["run"]["adapter_fingerprint"] for r in checked_predictions(out)}
    assert len(fingerprints) == 2 and weights_fingerprint(str(adapter)) in fingerprints


def test_another_dataset_into_the_same_out_is_refused(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    build(BuildConfig(source="demo", out=other, splits=["test"], limit_per_class=2))  # other rows
    out = tmp_path / "eval"
    evaluate(EvalConfig(dataset=str(demo), out=out, model="m", level="fine"), backend=Echo())
    copy, rebuilt = tmp_path / "copy", tmp_path / "rebuilt"
    shutil.copytree(demo, copy)  # the same build elsewhere is the same dataset: resumed
    # the same rows built again (make build-dataset re-run) are the same dataset too: resumed
    build(BuildConfig(source="demo", out=rebuilt, splits=["test"], limit_per_class=1))
    for same in (copy, rebuilt):
        assert (
            evaluate(EvalConfig(dataset=str(same), out=out, model="m", level="fine"), backend=Echo())["asked"]
            == 0
        )
    with pytest.raises(FinerError, match="holds answers about another dataset .* pass --overwrite"):
        evaluate(EvalConfig(dataset=str(other), out=out, model="m", level="fine"), backend=Echo())
    capsys.readouterr()  # the builds' progress bars
    code, _, err = run_cli(
        ["eval", "--dataset", str(other), "--model", "m", "--out", str(out), "--level", "fine"], capsys
    )
    assert code == 2 and len(err.splitlines()) == 1 and "another dataset" in err
    fresh = evaluate(
        EvalConfig(dataset=str(other), out=out, model="m", level="fine", overwrite=True), backend=Echo()
    )
    assert fresh["asked"] == 16 and len(fresh["runs"]) == 1 and len(checked_predictions(out)) == 16


def test_weights_fingerprint_reads_content_not_paths_or_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fingerprint_module, "FULL_HASH_BYTES", 1024)  # take the sampled path for big files
    model = tmp_path / "model"
    model.mkdir()
    tensors = {f"layer{i}": torch.zeros(64, 64) for i in range(3)}
    save_file(tensors, str(model / "model.safetensors"))
    (model / "config.json").write_text("{}")
    (model / "checkpoint-1").mkdir()  # a sub-folder is not what loads
    before = weights_fingerprint(str(model))
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    os.utime(copy / "model.safetensors", (0, 0))
    (model / "checkpoint-1" / "x.bin").write_bytes(b"1")
    assert weights_fingerprint(str(copy)) == weights_fingerprint(str(model)) == before
    tensors["layer1"][32, 0] = 1.0  # one weight in the middle of one tensor of a large file
    save_file(tensors, str(model / "model.safetensors"))
    assert weights_fingerprint(str(model)) != before
    assert weights_fingerprint(None) is None


def test_a_hub_id_is_its_cached_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--vlm"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    assert weights_fingerprint("someone/vlm") == f"hub:{commit}"
    assert weights_fingerprint("someone/not-cached") == "hub:unresolved"  # offline in tests


# --- unreadable images -------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """An imagefolder build whose rows point at files: two classes of two images."""
    root = tmp_path / "root"
    for name in ("great_horned_owl", "barn_owl"):
        (root / "test" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (48, 40), (40 * i, 90, 160)).save(root / "test" / name / f"{i}.jpg")
    out = tmp_path / "data"
    build(BuildConfig(source="imagefolder", root=root, out=out, knowledge=False))
    return root


def _break(root: Path) -> None:
    (root / "test" / "barn_owl" / "0.jpg").unlink()  # deleted after the build
    truncated = root / "test" / "great_horned_owl" / "1.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])  # cut short


def _config(data: Path, out: Path, backend: str, url: str | None) -> EvalConfig:
    model = "m" if backend == "openai" else str(tiny_vlm_path("llava"))
    return EvalConfig(
        dataset=str(data), out=out, model=model, backend=backend, base_url=url, level="fine", max_new_tokens=2
    )


@pytest.mark.parametrize("backend", ["hf", "openai"])
def test_unreadable_images_are_skipped_counted_and_listed(backend: str, files: Path, tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "eval"
    _break(files)
    with FakeOpenAI(lambda request: "Answer: Barn Owl") as server:
        config = _config(data, out, backend, server.url)
        result = evaluate(config)
        assert result["answered"] == 2 and result["skipped"] == 2 and result["failed"] == 0
        assert any("skipped 2 question(s) whose image cannot be read" in w for w in result["warnings"])
        reasons = sorted(r["skipped"] for r in checked_predictions(out) if "skipped" in r)
        assert reasons[1] == "missing file" and "truncated" in reasons[0].lower(), reasons
        assert result["runs"][0]["levels"]["fine"]["skipped"] == 2
        assert result["runs"][0]["levels"]["fine"]["count"] == 2

        again = evaluate(config)  # the same images fail the same way: skipped again, not written twice
        assert again["asked"] == 2 and again["skipped"] == 2 and len(checked_predictions(out)) == 4

        Image.new("RGB", (48, 40)).save(files / "test" / "barn_owl" / "0.jpg")  # the file is back
        fixed = evaluate(config)
    assert fixed["answered"] == 1 and fixed["skipped"] == 1
    assert fixed["runs"][0]["levels"]["fine"]["count"] == 3
    assert sum("skipped" not in r for r in read_predictions(out / "predictions.jsonl")) == 3


@pytest.mark.parametrize("backend", ["hf", "openai"])
def test_a_box_of_negative_size_or_a_bomb_skips_its_image(
    backend: str, demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = datasets.load_from_disk(str(demo))
    bad = loaded["test"].map(
        lambda row, i: {
            "bbox": [30.0, 30.0, -10.0, 5.0] if i == 0 else [0.0, 0.0, 1.0, 1.0] if i == 1 else row["bbox"]
        },
        with_indices=True,
    )
    data = tmp_path / "boxes"
    datasets.DatasetDict({"test": bad}).save_to_disk(str(data))
    with FakeOpenAI(lambda request: "Answer: Barn Owl") as server:
        config = _config(data, tmp_path / "eval", backend, server.url)
        config.crop_to_bbox, config.limit, config.batch_size = True, 4, 4
        result = evaluate(config)
        assert result["answered"] + result["skipped"] == 4 and result["skipped"] >= 1
        reasons = [r["skipped"] for r in checked_predictions(tmp_path / "eval") if "skipped" in r]
        assert any("Coordinate" in reason or "empty image" in reason for reason in reasons), reasons

        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # every image is now a decompression bomb
        config.out, config.crop_to_bbox = tmp_path / "bombs", False
        bombs = evaluate(config)
    assert bombs["answered"] == 0 and bombs["skipped"] == 4
    assert all("DecompressionBomb" in r["skipped"] for r in checked_predictions(tmp_path / "bombs"))


# --- what is stored ------------------------------------------------------------------------------------


def test_long_replies_are_stored_capped_and_empty_answers_counted(demo: Path, tmp_path: Path) -> None:
    with FakeOpenAI(lambda request: "Let me think. " * 150_000 + "Answer: Barn Owl") as server:
        config = EvalConfig(dataset=str(demo), out=tmp_path, model="m", backend="openai", base_url=server.url)
        config.level, config.limit, config.max_new_tokens = "fine", 2, 1_000_000
        result = evaluate(config)
    saved = checked_predictions(tmp_path)
    assert (tmp_path / "predictions.jsonl").stat().st_size < 4 * (MAX_STORED_CHARS + 2000)
    assert all(r["stored_truncated"] and len(r["prediction"]) <= MAX_STORED_CHARS + 100 for r in saved)
    assert all(r["prediction"].endswith("Answer: Barn Owl") for r in saved)  # what scoring reads survives
    assert result["runs"][0]["levels"]["fine"]["stored_truncated"] == 2
    assert any("2 reply(ies) stored cut" in w for w in result["warnings"])

    with FakeOpenAI(lambda request: "Answer:") as server:
        config.out, config.base_url = tmp_path / "empty", server.url
        empty = evaluate(config)
    assert empty["runs"][0]["levels"]["fine"]["empty"] == 2
    assert any("2 empty answer(s), scored as wrong" in w for w in empty["warnings"])
