"""Publishing a fine-tuned adapter on the Hugging Face Hub (`finer finetune … --push-to-hub REPO_ID`).

One commit holds the adapter (config + safetensors), the processor files saved with it, `finer_run.json`
and a model card: YAML metadata (base_model, datasets, library_name peft, tags) and a body with the recipe,
the prompt format, the trained parts, the versions of transformers / peft / trl it was trained with (an
adapter saved by a newer transformers may not load on an older one) and the evaluation numbers when there
are some. Checkpoints, logs and pickles (`training_args.bin`) stay local.

The token goes to `huggingface_hub` and nowhere else (the same rules as `finer.hub.datasets.push_dataset`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from finer.errors import FinerError
from finer.records import RunRecord, read_run_file
from finer.run_folder import RUN_FILE

__all__ = ["adapter_card", "adapter_files", "push_adapter"]

#: Top-level files of an output folder that are never uploaded.
_NEVER = re.compile(r"(training_args\.bin|.*\.pt|.*\.pth|.*\.pkl|.*\.partial|README\.md)$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _read_run(folder: Path) -> RunRecord:
    if not (folder / "adapter_config.json").is_file():
        raise FinerError(f"{folder}: no adapter_config.json; pass the --output-dir of a `finer finetune` run")
    if not (folder / RUN_FILE).is_file():
        raise FinerError(f"{folder}: no {RUN_FILE}, so the run did not finish; finish (or --resume) it first")
    return read_run_file(folder)


def adapter_files(folder: Path) -> list[Path]:
    """The files of an output folder that make up the published adapter (top level only)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not _NEVER.fullmatch(p.name))


def _hub_datasets(names: list[str]) -> list[str]:
    """Dataset references that are Hub repo ids (local folders have no place in card metadata)."""
    return [n for n in names if _REPO_ID.match(n) and not Path(n).expanduser().exists()]


def _base_model(folder: Path, run: RunRecord) -> str:
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    return str(config.get("base_model_name_or_path") or run.get("config", {}).get("model") or "")


def adapter_card(
    folder: Path, repo_id: str, run: RunRecord, eval_results: dict[str, Any] | None = None
) -> str:
    """The README.md of an adapter repository, from the adapter's config and the run's `finer_run.json`."""
    config = run.get("config", {})
    base = _base_model(folder, run)
    datasets = list(config.get("datasets") or [])
    versions = run.get("versions", {})
    meta: dict[str, Any] = {
        "library_name": "peft",
        "pipeline_tag": "image-text-to-text",
        "tags": ["finer", "fine-grained-recognition", "lora", "peft", "trl", "sft"],
    }
    if _REPO_ID.match(base) and not Path(base).exists():
        meta["base_model"] = base
        meta["tags"].append(f"base_model:adapter:{base}")
    else:
        meta["base_model"] = base  # a local base: named for provenance, though the Hub cannot link it
    if hub := _hub_datasets(datasets):
        meta["datasets"] = hub
    header = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()
    lines = [f"---\n{header}\n---", "", f"# {repo_id.split('/')[-1]}", ""]
    lines += [
        f"A LoRA adapter for `{base}` trained with finer (`finer finetune`) for "
        "attribute-grounded fine-grained recognition: name the species, breed or model in an image.",
        "",
        "## Use",
        "",
        "```python",
        "import finer",
        "",
        f'model, processor = finer.load_adapter("{repo_id}")  # base model from the adapter config',
        "```",
        "",
        f"or `finer predict IMAGE --adapter {repo_id}`; `finer merge --adapter {repo_id} --out DIR` writes a "
        "merged model for serving (vLLM or any OpenAI-compatible server).",
        "",
        "## Recipe",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    recipe_keys = (
        "format",
        "attributes",
        "split",
        "hold_out",
        "train_llm",
        "train_vision",
        "train_projector",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "learning_rate",
        "epochs",
        "max_steps",
        "batch_size",
        "grad_accum",
        "max_length",
        "lr_scheduler",
        "seed",
    )
    lines += [f"| {key} | `{config[key]}` |" for key in recipe_keys if config.get(key) is not None]
    lines += [f"| datasets | {', '.join(f'`{d}`' for d in datasets) or '-'} |"]
    if "global_step" in run:
        lines += [f"| steps trained | {run['global_step']} |"]
    if run.get("first_loss") is not None and run.get("last_loss") is not None:
        lines += [f"| loss | {run['first_loss']:.4g} → {run['last_loss']:.4g} |"]
    lines += ["", "## Format", ""]
    if config.get("format") == "finer":
        lines += [
            "`finer`: three assistant turns per image (attributes, then the description, then the name), as "
            "in the FINER paper; ask with the attribute-seeking protocol (`finer eval --mode attrseek`).",
        ]
    else:
        lines += [
            '`direct`: one question, answered with the name after "Answer:" (`finer eval --mode direct`).'
        ]
    lines += ["", "## Trained parts", ""]
    trainable = run.get("trainable_parameters") or {}
    if trainable:
        lines += ["| part | trainable | total |", "|---|---|---|"]
        lines += [f"| {p} | {c['trainable']:,} | {c['total']:,} |" for p, c in trainable.items()]
        lines += [""]
    if run.get("lora_target_modules"):
        lines += [f"LoRA targets: `{run['lora_target_modules']}`", ""]
    if run.get("modules_to_save"):
        lines += [f"Trained in full: {', '.join(f'`{m}`' for m in run['modules_to_save'])}", ""]
    lines += [
        "## Versions",
        "",
        "Trained with the versions below. An adapter saved by a newer transformers may not load on an older "
        "one; `finer.load_adapter` refuses one whose LoRA weights did not load.",
        "",
        "| package | version |",
        "|---|---|",
    ]
    lines += [f"| {name} | {version} |" for name, version in versions.items()]
    results = {**({"fine-level accuracy (finetune)": run["eval"]} if run.get("eval") else {})}
    if eval_results:
        results.update(eval_results)
    if results:
        lines += ["", "## Evaluation", ""]
        for name, value in results.items():
            lines += [
                f"- {name}: " + (json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value))
            ]
    return "\n".join(lines).rstrip() + "\n"


def push_adapter(
    output_dir: str | Path,
    repo_id: str,
    private: bool = False,
    *,
    token: str | None = None,
    eval_results: dict[str, Any] | None = None,
) -> str:
    """Publish a finished `finer finetune` output folder as a Hub model repository; returns its URL."""
    from huggingface_hub import CommitOperationAdd

    from finer.hub.datasets import _reason, _scrub, open_repo, require_token

    folder = Path(output_dir).expanduser()
    run = _read_run(folder)
    token = require_token(token)
    try:
        api, repo_url = open_repo(token, repo_id, "model", private)
        repo_id = repo_url.repo_id
        card = adapter_card(folder, repo_id, run, eval_results)
        operations = [
            CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in adapter_files(folder)
        ]
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
        api.create_commit(
            repo_id,
            operations,
            repo_type="model",
            commit_message=f"finer: LoRA adapter for {_base_model(folder, run)}",
        )
    except FinerError:
        raise
    except Exception as err:  # every failure: one line, the token masked, nothing chained
        raise FinerError(_scrub(f"pushing {folder} to {repo_id} failed: {_reason(err)}", token)) from None
    return str(repo_url)
