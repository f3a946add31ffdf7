"""Adapters: load (local path and Hub repo id through the real cache layout), the LoRA check, predict, merge.

Nothing is trained: the adapters are made directly with PEFT on the tiny LLaVA, LoRA on the language model
with random (non-zero) B matrices, so that the adapter really changes the model's outputs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import huggingface_hub.constants
import pytest
import torch
import yaml
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import RepoUrl
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor
from typer.testing import CliRunner

import finer
from finer.cli import app
from finer.errors import FinerError
from finer.eval.scoring import extract_answer
from finer.hub.model_cards import push_adapter
from finer.models.loading import adapter_base, load_adapter, load_model
from finer.prompts import render
from finer.records import read_run_file
from finer.testing import tiny_image, tiny_vlm_path

#: Trains or generates with tiny models: seconds per test (`pytest -m 'not slow'` leaves them out).
pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 6
REPO_ID = "someone/tiny-llava-finer-lora"
_LM_LORA = r".*language_model.*\.(q_proj|v_proj)"


def _make_adapter(base: Path, out: Path, *, trained: bool) -> PeftModel:
    """A LoRA adapter on the LM saved with the processor; ``trained``: B random, else PEFT's zero init."""
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=_LM_LORA, init_lora_weights=not trained)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out)
    AutoProcessor.from_pretrained(base).save_pretrained(out)
    return peft_model.eval()


def _inputs(processor) -> dict:
    messages = render("direct", level="fine")
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[[tiny_image(3).convert("RGB")]], return_tensors="pt")


def _run(model, processor) -> tuple[torch.Tensor, str]:
    """(last-position logits, greedy generation text) for the direct fine-level prompt on one image."""
    inputs = _inputs(processor)
    with torch.inference_mode():
        logits = model(**inputs).logits[0, -1].float()
        output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    new = output[:, inputs["input_ids"].shape[1] :]
    return logits, processor.batch_decode(new, skip_special_tokens=True)[0].strip()


@pytest.fixture(scope="module")
def base() -> Path:
    return tiny_vlm_path("llava")


@pytest.fixture(scope="module")
def adapter(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor, str]:
    """(adapter folder, logits, generation) of the in-memory PeftModel."""
    folder = tmp_path_factory.mktemp("adapter")
    model = _make_adapter(base, folder, trained=True)
    logits, text = _run(model, AutoProcessor.from_pretrained(base))
    return folder, logits, text


def _publish_to_cache(folder: Path, cache: Path, repo_id: str) -> str:
    """Lay ``folder`` out as huggingface_hub's cache does after a download: blobs, a snapshot, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (len(link.relative_to(repo).parts) - 1)) / "blobs" / blob.name)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return commit


def test_load_adapter_local_round_trip(base: Path, adapter: tuple[Path, torch.Tensor, str]) -> None:
    folder, logits, text = adapter
    assert adapter_base(folder) == str(base)
    model, processor = finer.load_adapter(str(folder), device="cpu", dtype="float32")
    assert isinstance(model, PeftModel) and not model.training
    loaded_logits, loaded_text = _run(model, processor)
    assert torch.allclose(loaded_logits, logits, atol=1e-5)
    assert loaded_text == text
    plain = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32).eval()
    base_logits, _ = _run(plain, processor)
    assert not torch.allclose(base_logits, logits, atol=1e-3), "the adapter should change the model"


def test_load_model_uses_load_adapter(base: Path, adapter: tuple[Path, torch.Tensor, str]) -> None:
    folder, logits, _ = adapter
    model, processor = load_model(str(base), str(folder))
    assert isinstance(model, PeftModel)
    assert torch.allclose(_run(model, processor)[0], logits, atol=1e-5)


def test_load_adapter_by_repo_id_from_hub_cache(
    adapter: tuple[Path, torch.Tensor, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, logits, text = adapter
    cache = tmp_path / "hub"
    _publish_to_cache(folder, cache, REPO_ID)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    model, processor = load_adapter(REPO_ID, device="cpu", dtype="float32")
    loaded_logits, loaded_text = _run(model, processor)
    assert torch.allclose(loaded_logits, logits, atol=1e-5)
    assert loaded_text == text
    with pytest.raises(FinerError, match="someone/not-cached") as err:
        load_adapter("someone/not-cached")
    assert "\n" not in str(err.value)


def test_all_zero_lora_b_is_refused(base: Path, tmp_path: Path) -> None:
    _make_adapter(base, tmp_path / "untrained", trained=False)
    with pytest.raises(FinerError, match="untrained.*all zero") as err:
        load_adapter(tmp_path / "untrained", device="cpu")
    assert "\n" not in str(err.value)


def test_missing_adapter_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(FinerError, match="adapter_config.json"):
        load_adapter(tmp_path)


def test_predict_prints_the_answer(adapter: tuple[Path, torch.Tensor, str], tmp_path: Path) -> None:
    folder, _, text = adapter
    image = tmp_path / "bird.png"
    tiny_image(3).save(image)
    args = ["predict", str(image), "--adapter", str(folder), "--max-new-tokens", str(MAX_NEW_TOKENS)]
    result = CliRunner().invoke(app, [*args, "--raw"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == extract_answer(text)
    assert lines[1] == f"raw: {text}"


def test_predict_replays_the_finer_conversation(
    adapter: tuple[Path, torch.Tensor, str], tmp_path: Path
) -> None:
    folder, _, _ = adapter
    image = tmp_path / "bird.png"
    tiny_image(3).save(image)
    args = ["predict", str(image), "--adapter", str(folder), "--max-new-tokens", str(MAX_NEW_TOKENS)]
    result = CliRunner().invoke(app, [*args, "--mode", "finer", "--superordinate", "Bird", "--raw"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("group: ") and lines[1].startswith("attributes: ")
    assert len([line for line in lines if line.startswith("raw: ")]) == 3  # three turns, one conversation
    with pytest.raises(FinerError, match="--superordinate"):
        CliRunner().invoke(app, [*args, "--mode", "finer"], catch_exceptions=False)


def test_predict_needs_a_model_or_adapter(tmp_path: Path) -> None:
    with pytest.raises(FinerError, match="--model, --adapter"):
        CliRunner().invoke(app, ["predict", str(tmp_path / "x.png")], catch_exceptions=False)


def test_merge_equals_adapter_model(adapter: tuple[Path, torch.Tensor, str], tmp_path: Path) -> None:
    folder, logits, text = adapter
    out = tmp_path / "merged"
    result = CliRunner().invoke(
        app, ["merge", "--adapter", str(folder), "--out", str(out)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    merged = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    assert not isinstance(merged, PeftModel)
    merged_logits, merged_text = _run(merged, AutoProcessor.from_pretrained(out))
    assert torch.allclose(merged_logits, logits, atol=1e-4)
    assert merged_text == text
    keys = json.loads((out / "config.json").read_text())
    assert "lora" not in json.dumps(keys).lower()
    shutil.rmtree(out)


# --- publishing ---------------------------------------------------------------------------------------

SECRET = "hf_testSECRETadapterQ2mZ7vL4kT8"


class FakeModelHub:
    """The far end of `HfApi` for model repos: what `push_adapter` creates and commits; every token seen."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, fail: bool = False) -> None:
        self.files: dict[str, bytes] = {}
        self.tokens: set[str | None] = set()
        self.private: bool | None = None
        self.fail = fail
        monkeypatch.setattr(HfApi, "create_repo", lambda api, *a, **k: self.create_repo(api, *a, **k))
        monkeypatch.setattr(HfApi, "create_commit", lambda api, *a, **k: self.create_commit(api, *a, **k))

    def create_repo(self, api: HfApi, repo_id: str, *, repo_type: str, private: bool = False, **_) -> RepoUrl:
        assert repo_type == "model"
        self.tokens.add(api.token)
        self.private = private
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, api: HfApi, repo_id: str, operations, *, repo_type: str, **_) -> None:
        assert repo_type == "model"
        self.tokens.add(api.token)
        if self.fail:
            request = httpx.Request("POST", "https://huggingface.co/api")
            response = httpx.Response(401, request=request)
            raise HfHubHTTPError(f"401 Unauthorized (Authorization: Bearer {api.token})", response=response)
        for op in operations:
            source = op.path_or_fileobj
            self.files[op.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()


#: finer_run.json as the first finer wrote it: without the later `train_loss_steps` and eval's `failed`.
FIRST_RUN_FILE = {
    "config": {"model": "ignored", "datasets": ["someone/finer-cub", "./data/demo"], "format": "direct"},
    "family": "llava-1.5",
    "chat_template": "ours:llava-1.5.jinja",
    "lora_target_modules": _LM_LORA,
    "modules_to_save": [],
    "trainable_parameters": {"llm": {"trainable": 1024, "total": 100000}},
    "samples": {"someone/finer-cub": {"rows": 8, "held_out": 0, "too_long": 0, "trained": 8}},
    "attributes_column": None,
    "resumed_from": None,
    "global_step": 2,
    "train_loss": 2.4,
    "first_loss": 3.5,
    "last_loss": 1.25,
    "losses": [3.5, 1.25],
    "train_runtime_s": 1.5,
    "versions": {"transformers": "5.23.0", "peft": "0.21.0", "trl": "1.16.0"},
    "eval": {"split": "test", "images": 4, "fine_accuracy": 0.5, "chance": 0.25, "samples": []},
    "duration_s": 2.0,
}


@pytest.fixture
def run_dir(adapter: tuple[Path, torch.Tensor, str], tmp_path: Path) -> Path:
    """A finished `finer finetune` output folder: the adapter, a checkpoint, training args, finer_run.json."""
    out = tmp_path / "run"
    shutil.copytree(adapter[0], out)
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"old")
    (out / "training_args.bin").write_bytes(b"pickle")
    (out / "finer_run.json").write_text(json.dumps(FIRST_RUN_FILE))
    return out


def test_a_run_file_of_the_first_finer_still_loads(run_dir: Path) -> None:
    assert read_run_file(run_dir) == FIRST_RUN_FILE


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda run: json.dumps(run)[:40], "not valid JSON"),
        (lambda run: json.dumps({k: v for k, v in run.items() if k != "global_step"}), "lacks `global_step`"),
        (lambda run: json.dumps({**run, "eval": {"split": "test"}}), "lacks `eval.images`"),
    ],
)
def test_a_damaged_run_file_is_one_line_naming_it_and_the_fix(
    damage: Any, problem: str, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    hub = FakeModelHub(monkeypatch)
    path = run_dir / "finer_run.json"
    path.write_text(damage(FIRST_RUN_FILE))
    with pytest.raises(FinerError) as err:
        push_adapter(run_dir, "someone/tiny-adapter")
    message = str(err.value)
    assert message.startswith(f"{path}: {problem}") and "\n" not in message
    assert message.endswith(f"; delete {run_dir} and train it again")
    assert not hub.files  # nothing published


def test_push_adapter_uploads_adapter_processor_and_card(
    run_dir: Path, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    hub = FakeModelHub(monkeypatch)
    url = push_adapter(run_dir, "someone/tiny-adapter", eval_results={"fine EM (test)": 0.42})
    assert url == "https://huggingface.co/someone/tiny-adapter"
    assert hub.tokens == {SECRET} and hub.private is False
    names = set(hub.files)
    assert {"adapter_config.json", "adapter_model.safetensors", "finer_run.json", "README.md"} <= names
    assert {"tokenizer_config.json", "processor_config.json"} & names
    assert "training_args.bin" not in names and not any(n.startswith("checkpoint") for n in names)
    assert hub.files["adapter_model.safetensors"] == (run_dir / "adapter_model.safetensors").read_bytes()
    card = hub.files["README.md"].decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == str(base)
    assert meta["library_name"] == "peft" and "finer" in meta["tags"]
    assert meta["datasets"] == ["someone/finer-cub"]
    for text in (
        "transformers | 5.23.0",
        "peft | 0.21.0",
        "trl | 1.16.0",
        "fine EM (test): 0.42",
        "`direct`",
    ):
        assert text in card
    for data in hub.files.values():
        assert SECRET.encode() not in data
    for file in run_dir.rglob("*"):
        assert not file.is_file() or SECRET.encode() not in file.read_bytes()


def test_push_adapter_errors_are_one_line_without_token(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    FakeModelHub(monkeypatch, fail=True)
    with pytest.raises(FinerError) as err:
        push_adapter(run_dir, "someone/tiny-adapter")
    message = str(err.value)
    assert SECRET not in message and "\n" not in message and "401" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_push_adapter_refuses_an_unfinished_run(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    (run_dir / "finer_run.json").unlink()
    with pytest.raises(FinerError, match="did not finish"):
        push_adapter(run_dir, "someone/tiny-adapter")


def test_finetune_push_without_token_fails_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(FinerError, match="--push-to-hub: no Hugging Face token"):
        CliRunner().invoke(app, ["finetune", "--push-to-hub", "someone/x"], catch_exceptions=False)


def test_a_b_matrix_saved_zero_is_fine_one_that_did_not_load_is_not(base: Path, tmp_path: Path) -> None:
    trained = tmp_path / "trained"
    _make_adapter(base, trained, trained=True)
    config_file = trained / "adapter_config.json"  # as `finer finetune` saves it: B starts at zero
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "init_lora_weights": True}))
    file = trained / "adapter_model.safetensors"
    tensors = load_file(file)
    first_b = sorted(key for key in tensors if ".lora_B." in key)[0]

    untouched = dict(tensors, **{first_b: torch.zeros_like(tensors[first_b])})  # a layer without gradient
    save_file(untouched, file)
    load_adapter(trained, device="cpu")

    renamed = dict(tensors)
    renamed[first_b.replace("q_proj", "x_proj")] = renamed.pop(first_b)  # this one never reaches the model
    save_file(renamed, file)
    with pytest.raises(FinerError, match="1 of 4 LoRA B matrices are all zero"):
        load_adapter(trained, device="cpu")
