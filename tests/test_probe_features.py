"""`finer probe-features`: pooled vision-tower vs post-projector features and a linear probe on each, for the
tiny models of every family (Qwen2-VL from its config alone: its processor needs torchvision)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from finer.data.build import BuildConfig, build
from finer.errors import FinerError
from finer.eval.probes import PROBE_FILE, PROBE_REPORT, ProbeConfig, image_features, probe_features
from finer.models.families import detect_family
from finer.testing import TINY_FAMILIES, tiny_image, tiny_vlm_path, unavailable_reason
from tests.cli_helpers import run_cli

#: Trains or generates with tiny models: seconds per test (`pytest -m 'not slow'` leaves them out).
pytestmark = pytest.mark.slow

CLASSES = 8  # the demo's species
PER_CLASS = 4


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "demo"
    build(BuildConfig(source="demo", out=out, limit_per_class=PER_CLASS))
    return out


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_probe_every_family(family: str, demo: Path, tmp_path: Path) -> None:
    if reason := unavailable_reason(family):
        pytest.skip(reason)
    model = str(tiny_vlm_path(family))
    run = probe_features(ProbeConfig(model=model, dataset=str(demo), out=tmp_path, batch_size=8))
    config = AutoConfig.from_pretrained(model)
    vision, projector = run["probes"]["vision"], run["probes"]["projector"]
    # the tower's width: Qwen2-VL calls it embed_dim (its hidden_size is the merger's output, the LM's width)
    tower_width = getattr(config.vision_config, "embed_dim", None) or config.vision_config.hidden_size
    assert vision["dim"] == tower_width
    assert projector["dim"] == config.text_config.hidden_size  # what the language model receives
    for result in (vision, projector):
        assert 0 <= result["test_accuracy"] <= 1 and 0 <= result["train_accuracy"] <= 1
    assert (run["classes"], run["train_images"], run["test_images"]) == (CLASSES, 32, 32)
    assert run["chance"] == pytest.approx(1 / CLASSES)
    assert run["family"] == detect_family(config.model_type).name
    # The probe can learn: even random towers separate the species' colours on the images it trained on.
    assert vision["train_accuracy"] > 2 * run["chance"]
    assert json.loads((tmp_path / PROBE_FILE).read_text())["runs"] == [run]
    assert "| vision tower (dim) | projector (dim) |" in (tmp_path / PROBE_REPORT).read_text()


def test_pooling_is_the_modules_mean() -> None:
    """LLaVA: the tower's last layer without CLS, and the projector applied to the layer it reads."""
    path = tiny_vlm_path("llava")
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    images = [tiny_image(seed) for seed in range(3)]
    vision, projector = image_features(model, detect_family("llava"), processor.image_processor, images)
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        tower = model.model.vision_tower(pixels, output_hidden_states=True)
        read = tower.hidden_states[model.config.vision_feature_layer][:, 1:]
        expected_projector = model.model.multi_modal_projector(read).mean(1)
    np.testing.assert_allclose(vision, tower.last_hidden_state[:, 1:].mean(1).numpy(), atol=1e-5)
    np.testing.assert_allclose(projector, expected_projector.numpy(), atol=1e-5)


def test_qwen2_vl_mixed_sizes_split_per_image() -> None:
    """Qwen2-VL flattens every image's patches into one sequence; sizes differ, so tokens per image do."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4}
    config = Qwen2VLConfig(
        text_config={
            "model_type": "qwen2_vl_text",
            **text,
            "num_key_value_heads": 2,
            "vocab_size": 128,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        },
        vision_config={"depth": 1, "embed_dim": 32, "num_heads": 4, "mlp_ratio": 2, "hidden_size": 64},
        image_token_id=126,
        video_token_id=127,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2VLForConditionalGeneration(config).eval()
    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    family = detect_family("qwen2_vl")
    images = [tiny_image(0, size=56), tiny_image(1, size=112), tiny_image(2, size=84)]
    vision, projector = image_features(model, family, processor, images)
    assert vision.shape == (3, 32) and projector.shape == (3, 64)
    for index, image in enumerate(images):
        alone = image_features(model, family, processor, [image])
        np.testing.assert_allclose(vision[index], alone[0][0], atol=1e-5)
        np.testing.assert_allclose(projector[index], alone[1][0], atol=1e-5)


def test_cli_writes_beside_an_eval_report(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "report.md").write_text("# Evaluation report\n\nrows\n")
    argv = ["probe-features", "--model", str(tiny_vlm_path("idefics3")), "--dataset", str(demo)]
    argv += ["--out", str(tmp_path), "--limit-per-class", "2", "--batch-size", "5"]
    code, out, _ = run_cli(argv, capsys)
    assert code == 0 and "vision (dim 32)" in out and "projector (dim 64)" in out
    run_cli(argv, capsys)  # the same measurement again replaces the first
    run_cli([*argv[:-3], "3", *argv[-2:]], capsys)  # another limit is another run
    runs = json.loads((tmp_path / PROBE_FILE).read_text())["runs"]
    assert [r["limit_per_class"] for r in runs] == [2, 3]
    assert [r["train_images"] for r in runs] == [2 * CLASSES, 3 * CLASSES]
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# Evaluation report\n\nrows\n")
    assert report.count("Linear probes: vision tower vs projector") == 1
    assert report.count("| `") == 2  # one row per run


def test_bad_input_is_one_line(demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bert = tmp_path / "bert"
    AutoConfig.for_model("bert").save_pretrained(bert)
    no_labels = tmp_path / "no-labels"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image_id": ["a"]})}).save_to_disk(no_labels)
    llava = str(tiny_vlm_path("llava"))
    cases = [
        (["--model", str(bert), "--dataset", str(demo)], "not in finer's family registry"),
        (["--model", llava, "--dataset", str(demo), "--train-split", "val"], "has no split 'val'"),
        (["--model", llava, "--dataset", str(no_labels)], "lacks column(s) image, label"),
    ]
    capsys.readouterr()  # the progress bars of saving the datasets above
    for args, message in cases:
        code, _, err = run_cli(["probe-features", *args, "--out", str(tmp_path / "out")], capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not (tmp_path / "out").exists()
    one_class = tmp_path / "one-class"
    demo_rows = datasets.load_from_disk(str(demo))
    first = demo_rows["train"].filter(lambda label: label == 0, input_columns="label")
    datasets.DatasetDict({"train": first, "test": demo_rows["test"]}).save_to_disk(one_class)
    with pytest.raises(FinerError, match="at least two classes"):
        probe_features(ProbeConfig(model=llava, dataset=str(one_class), out=tmp_path / "out"))
