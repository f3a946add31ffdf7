"""`finer export-lmms-eval`: our benchmark as an lmms-eval task, so the same questions and scoring run there.

The export writes three files per task: ``<task>.yaml`` (lmms-eval's task config), ``<task>_hooks.py`` (the
``!function`` hooks the YAML names) and ``<task>_settings.json`` (mode, level, options and the dataset's
label pool, which choice distractors and closed lists are drawn from), with the task name made a module name
(``[^A-Za-z0-9_]`` → ``_``). Each task carries its own hooks and settings, so several tasks share one
folder without one export changing another's level or options. The hooks delegate to `LmmsTask`, which
asks through `finer.eval.tasks.EvalPlan` and scores with `finer.eval.scoring`: the prompts, options and
scores are those of `finer eval`, so `finer` must be installed where lmms-eval runs.

What the files follow, as read in lmms-eval's source (EvolvingLMMs-Lab/lmms-eval: ``lmms_eval/api/task.py``
``TaskConfig`` / ``ConfigurableTask`` / ``ConfigurableMessagesTask``, ``lmms_eval/protocol.py``, the
``import_function`` YAML constructor in ``lmms_eval/utils.py``, ``lmms_eval/tasks/__init__.py``):

- ``!function module.name`` imports ``name`` from ``module.py`` beside the YAML (a file, not a package);
- callable hooks may get the task's ``lmms_eval_specific_kwargs`` as a second argument (``doc_to_text``,
  ``doc_to_visual``, ``doc_to_messages``; ``doc_to_text`` also as a keyword, always, for some models),
  and ``process_results`` may get ``full_docs``: every hook accepts them;
- chat models (``ConfigurableMessagesTask``) call ``doc_to_messages(doc)``: a list of ``{"role", "content"}``
  with blocks ``{"type": "text", "text"}`` and ``{"type": "image", "url": PIL image}``; simple models call
  ``doc_to_visual`` and ``doc_to_text`` instead, so both are written;
- ``ConfigurableTask.__init__`` calls ``doc_to_text`` and ``doc_to_target`` on the first document, and
  requests are built from documents whose image columns were removed: ``doc_to_text`` is required and must
  not need the image;
- ``process_results(doc, results)`` gets the stripped generations and returns ``{metric: value}``; each
  metric of ``metric_list`` names its aggregation (``mean``) and ``higher_is_better``;
- ``dataset_kwargs: {load_from_disk: true}`` makes it call ``datasets.load_from_disk(dataset_path)``, else
  ``datasets.load_dataset(dataset_path, ...)`` (a Hub repo);
- ``generation_kwargs`` without ``until`` stop at a blank line (``TaskConfig.__post_init__``), which would
  cut an answer given after one: ``until: []`` keeps the whole answer, as `finer eval` does;
- ``metadata`` as a mapping: its ``version`` becomes the task version (a list is ignored);
- ``dataset_path`` is read as it is written (relative to where lmms-eval runs, not to the YAML), so a
  local dataset is written as an absolute path: move the dataset, export again.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import finer
from finer.errors import FinerError
from finer.eval.distractors import DEFAULT_MODEL, check_distractors, distractor_setup
from finer.eval.scoring import LEVELS, score, score_choice
from finer.eval.tasks import EvalPlan, Task
from finer.prompts import template_sha256

__all__ = [
    "EXPORT_MODES",
    "METRICS",
    "CPU_MODEL_ARGS",
    "ExportConfig",
    "LmmsTask",
    "export_lmms_eval",
    "run_hint",
]

#: Modes that fit lmms-eval's one generation per document (attrseek needs the model's first answer).
EXPORT_MODES: tuple[str, ...] = ("direct", "choice")
#: The metrics `process_results` returns per mode, all averaged over documents.
METRICS: dict[str, tuple[str, ...]] = {"direct": ("modified_em", "strict_em", "f1"), "choice": ("accuracy",)}
#: What `--model_args` needs beside ``pretrained=`` for lmms-eval's transformers models (``llava_hf``,
#: ``qwen2_5_vl``, ``huggingface``, …) to run on a CPU: they default to CUDA.
CPU_MODEL_ARGS = "device=cpu,device_map=cpu"
#: Bumped when the generated task changes meaning, so that lmms-eval's version column tells results apart.
TASK_VERSION = "1.0"
_HOOKS = ("doc_to_visual", "doc_to_text", "doc_to_messages", "doc_to_target", "process_results")
_TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

_HOOKS_MODULE = '''"""lmms-eval hooks of the finer task {task!r} (`finer export-lmms-eval`, finer {version}).

Questions and scores come from the installed `finer` package, configured by {settings} beside this file;
export again rather than editing it. lmms-eval may pass the task's `lmms_eval_specific_kwargs` (and
`full_docs`): the task's own settings file decides everything, so they are accepted and not needed.
"""

from pathlib import Path

from finer.eval.lmms_eval import LmmsTask

_TASK = LmmsTask.load(Path(__file__).with_name("{settings}"))


def doc_to_visual(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> list:
    return _TASK.doc_to_visual(doc)


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return _TASK.doc_to_text(doc)


def doc_to_messages(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> list[dict]:
    return _TASK.doc_to_messages(doc)


def doc_to_target(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return _TASK.doc_to_target(doc)


def process_results(doc: dict, results: list[str], full_docs: object = None) -> dict[str, float]:
    return _TASK.process_results(doc, results)
'''


class LmmsTask:
    """One exported task at run time: what its generated hooks module calls, per lmms-eval document.

    A document is a row of the built dataset (docs/design.md §3), with its image decoded by `datasets`.
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self.mode: str = settings["mode"]
        self.level: str = settings["level"]
        run = {
            "mode": self.mode,
            "gold_parent": False,
            "choices": settings["choices"],
            "seed": settings["seed"],
            **settings.get("distractors", {}),
        }
        mined = settings.get("neighbours")
        self.plan = EvalPlan(
            run=run,
            concepts=settings["concepts"],
            images=None,
            neighbours={self.level: mined} if mined else None,
        )

    @classmethod
    def load(cls, path: Path) -> LmmsTask:
        return cls(json.loads(Path(path).read_text(encoding="utf-8")))

    def question(self, doc: dict[str, Any]) -> Task:
        """The question `finer eval` asks about this row at the task's level (options seeded per image)."""
        return self.plan.task(0, doc, self.level)

    def doc_to_messages(self, doc: dict[str, Any]) -> list[dict[str, Any]]:
        """Our rendered prompt in lmms-eval's chat format, the row's image in the template's image slot."""
        image = doc["image"].convert("RGB")
        return [
            {
                "role": message["role"],
                "content": [
                    {"type": "image", "url": image} if block["type"] == "image" else dict(block)
                    for block in message["content"]
                ],
            }
            for message in self.question(doc).first
        ]

    def doc_to_visual(self, doc: dict[str, Any]) -> list[Any]:
        return [doc["image"].convert("RGB")]

    def doc_to_text(self, doc: dict[str, Any]) -> str:
        """The prompt's text alone (simple models place the image themselves); needs no image column."""
        return "\n".join(
            block["text"]
            for message in self.question(doc).first
            for block in message["content"]
            if "text" in block
        )

    def doc_to_target(self, doc: dict[str, Any]) -> str:
        """The gold option letter (choice), else the canonical gold label; scoring accepts every gold."""
        if self.mode == "choice":
            return self.question(doc).record["answer"]
        gold = doc[self.level]
        return gold if isinstance(gold, str) else (gold[0] if gold else "")

    def process_results(self, doc: dict[str, Any], results: list[str]) -> dict[str, float]:
        """Our scores of the first generation: the parsed letter, or modified EM, strict EM and F1 with
        hierarchical credit (docs/design.md §1)."""
        prediction = results[0] if results else ""
        if self.mode == "choice":
            record = self.question(doc).record
            return {"accuracy": score_choice(prediction, record["answer"], len(record["options"]))}
        result = score(prediction, self.level, doc["superordinate"], doc["coarse"], doc["fine"])
        return {"modified_em": result.em, "strict_em": result.strict_em, "f1": result.f1}


@dataclass
class ExportConfig:
    """Everything `finer export-lmms-eval` was asked to do."""

    dataset: str
    out: Path
    mode: str = "direct"
    level: str = "fine"
    split: str = "test"
    task: str | None = None
    choices: int = 5
    seed: int = 0
    max_new_tokens: int = 128
    distractors: str = "siblings"
    distractor_model: str = DEFAULT_MODEL
    distractor_space: str = "text"


def _default_name(dataset: str, level: str, mode: str) -> str:
    """finer_<dataset>_<level>[_choice]: lmms-eval registers tasks by name, so each export gets its own."""
    stem = re.sub(r"[^a-z0-9]+", "_", Path(dataset.rstrip("/")).name.lower()).strip("_")
    stem = stem.removeprefix("finer_") or "dataset"  # a repo named finer-cub gives finer_cub_fine
    return "_".join(["finer", stem, level, *(["choice"] if mode == "choice" else [])])


def _module(task: str) -> str:
    """The stem of a task's hooks module and settings file: a module name, so ``!function`` can import it."""
    return re.sub(r"[^A-Za-z0-9_]", "_", task)


def run_hint(task: str, folder: Path | str) -> str:
    """The lmms-eval command that runs the exported task on a CPU."""
    return (
        f"python -m lmms_eval --model llava_hf --model_args pretrained=ID,{CPU_MODEL_ARGS} "
        f"--tasks {task} --include_path {folder}"
    )


def _q(value: str) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(value, ensure_ascii=False)


def _yaml(config: ExportConfig, task: str, dataset: Path | None) -> str:
    """The task config; written by hand because PyYAML cannot emit lmms-eval's ``!function`` tags."""
    lines = [
        f"# lmms-eval task written by `finer export-lmms-eval` (finer {finer.__version__}).",
        f"# Run it on a CPU with   {run_hint(task, 'DIR')}",
        "# (DIR: this folder; --model: lmms-eval's class for your model's family, e.g. llava_hf or",
        f"# qwen2_5_vl; on a GPU leave out {CPU_MODEL_ARGS}). {_module(task)}_hooks.py imports `finer`:",
        "# install it where lmms-eval runs.",
        f"task: {_q(task)}",
    ]
    if dataset is not None:
        lines += [
            "# dataset_path is absolute (lmms-eval reads it where it runs): move the data, export again.",
            f"dataset_path: {_q(str(dataset))}",
            "dataset_kwargs:",
            "  load_from_disk: true",
        ]
    else:
        lines.append(f"dataset_path: {_q(config.dataset)}")
    lines += [f"test_split: {_q(config.split)}", "output_type: generate_until"]
    lines += [f"{hook}: !function {_module(task)}_hooks.{hook}" for hook in _HOOKS]
    lines += [
        "generation_kwargs:",
        f"  max_new_tokens: {config.max_new_tokens}",
        "  temperature: 0",
        "  top_p: 1.0",
        "  num_beams: 1",
        "  do_sample: false",
        "  until: []",
        "metric_list:",
    ]
    for metric in METRICS[config.mode]:
        lines += [f"  - metric: {metric}", "    aggregation: mean", "    higher_is_better: true"]
    lines += [
        "metadata:",
        f"  version: {TASK_VERSION}",
        f"  finer_version: {_q(finer.__version__)}",
        f"  mode: {config.mode}",
        f"  level: {config.level}",
    ]
    return "\n".join(lines) + "\n"


def _check(config: ExportConfig) -> str:
    """The task name, once the options are known to make a task; else a one-line `FinerError`."""
    if config.mode not in EXPORT_MODES:
        raise FinerError(
            f"--mode {config.mode}: lmms-eval asks one question per document; "
            f"export {' or '.join(EXPORT_MODES)}"
        )
    if config.level not in LEVELS:
        raise FinerError(f"--level {config.level}: one task asks one level; choose {', '.join(LEVELS)}")
    if not 2 <= config.choices <= 26:
        raise FinerError(f"--choices must be between 2 and 26, not {config.choices}")
    if config.max_new_tokens < 1:
        raise FinerError("--max-new-tokens must be at least 1")
    check_distractors(config.distractors, config.distractor_space)
    kind = f"_{config.distractors}" if config.mode == "choice" and config.distractors != "siblings" else ""
    task = config.task or _default_name(config.dataset, config.level, config.mode) + kind
    if not _TASK_NAME.fullmatch(task):
        raise FinerError(f"--task {task!r}: use letters, digits, '_', '-' and '.'")
    return task


def _refuse_clash(settings: Path, task: str) -> None:
    """Two task names that make one module name ("a.b", "a_b") would share hooks: refuse the second."""
    try:
        other = json.loads(settings.read_text(encoding="utf-8")).get("task")
    except (OSError, ValueError, AttributeError):
        return
    if other not in (None, task):
        raise FinerError(
            f"--task {task!r}: {settings.parent} holds task {other!r}, whose files have the same name "
            f"({settings.name}); choose another --task or --out"
        )


def export_lmms_eval(config: ExportConfig) -> dict[str, Path]:
    """Write the task's YAML, hooks module and settings into ``config.out``; returns the paths by role
    (``yaml``, ``hooks``, ``settings``). Another task's files there stay as they are.

        The split is loaded once to check that it exists with the columns the hooks read, and for the label
        pool (the dataset's concepts), which is stored so that the task needs no second look-up at run time.
    """
    from finer.eval.engine import LABEL_COLUMNS, load_split

    task = _check(config)
    rows, concepts = load_split(config.dataset, config.split, [*LABEL_COLUMNS, "image"])
    if not rows.num_rows:
        raise FinerError(f"--dataset {config.dataset} split {config.split!r} has no rows")
    settings = {
        "task": task,
        "dataset": config.dataset,
        "split": config.split,
        "mode": config.mode,
        "level": config.level,
        "choices": config.choices,
        "seed": config.seed,
        "template_sha256": template_sha256(config.mode),
        "finer_version": finer.__version__,
        "concepts": [{k: c[k] for k in ("superordinate", "coarse", "fine")} for c in concepts],
    }
    if config.mode == "choice":  # the neighbours travel with the task: lmms-eval needs no encoder
        drawn, mined = distractor_setup(
            config.distractors,
            config.dataset,
            concepts,
            model=config.distractor_model,
            space=config.distractor_space,
        )
        settings["distractors"] = drawn
        settings["neighbours"] = mined.levels.get(config.level) if mined else None
    LmmsTask(settings).plan.levels(config.level)  # choice: refuses a level with a single label
    local = Path(config.dataset).expanduser()
    out = Path(config.out).expanduser()
    if out.exists() and not out.is_dir():
        raise FinerError(f"--out {out} is a file; pass a folder")
    out.mkdir(parents=True, exist_ok=True)
    stem = _module(task)
    paths = {
        "yaml": out / f"{task}.yaml",
        "hooks": out / f"{stem}_hooks.py",
        "settings": out / f"{stem}_settings.json",
    }
    _refuse_clash(paths["settings"], task)
    paths["settings"].write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["hooks"].write_text(
        _HOOKS_MODULE.format(task=task, version=finer.__version__, settings=paths["settings"].name),
        encoding="utf-8",
    )
    paths["yaml"].write_text(
        _yaml(config, task, local.resolve() if local.is_dir() else None), encoding="utf-8"
    )
    return paths
