"""`finer export-lmms-eval`: the YAML holds what lmms-eval reads, and the generated hooks, imported from the
task folder as lmms-eval imports them, ask our prompts and score with our scorer on real dataset rows."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import datasets
import pytest
import yaml
from PIL import Image

from finer.data.build import BuildConfig, build
from finer.errors import FinerError
from finer.eval.engine import load_split
from finer.eval.lmms_eval import METRICS, ExportConfig, export_lmms_eval
from finer.eval.scoring import score
from finer.eval.tasks import choice_options
from finer.prompts import render
from tests.cli_helpers import run_cli

# TaskConfig's fields in lmms-eval (lmms_eval/api/task.py): a key outside them fails TaskConfig(**config).
TASK_CONFIG_FIELDS = {
    "task", "task_alias", "tag", "group", "group_alias", "dataset_path", "dataset_name", "dataset_kwargs",
    "training_split", "validation_split", "test_split", "fewshot_split", "full_docs",
    "process_results_use_image", "process_docs", "doc_to_visual", "doc_to_text", "doc_to_target",
    "doc_to_choice", "doc_to_messages", "process_results", "use_prompt", "description", "target_delimiter",
    "fewshot_delimiter", "fewshot_config",
    "num_fewshot", "metric_list", "output_type", "generation_kwargs", "repeats", "filter_list",
    "should_decontaminate", "doc_to_decontamination_query", "cluster_key", "score_key", "metadata",
    "lmms_eval_specific_kwargs", "model_specific_generation_kwargs", "model_specific_target_kwargs",
    "reasoning_tags",
}  # fmt: skip
HOOKS = ("doc_to_visual", "doc_to_text", "doc_to_messages", "doc_to_target", "process_results")


class _Function(str):
    """A ``!function module.name`` tag, kept as its text."""


class _TaskLoader(yaml.SafeLoader):
    """Safe loading that tolerates lmms-eval's ``!function`` tag."""


_TaskLoader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "demo"
    build(BuildConfig(source="demo", out=out, splits=["test"], limit_per_class=2))
    return out


@pytest.fixture(scope="module")
def rows(demo: Path) -> list[dict[str, Any]]:
    return list(datasets.load_from_disk(str(demo))["test"])


def import_hooks(path: Path) -> ModuleType:
    """As lmms-eval's ``import_function`` does: the file beside the YAML, by location, named by its stem."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_task(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskLoader)  # noqa: S506 - a safe loader


@pytest.mark.parametrize("mode", ["direct", "choice"])
def test_yaml_holds_what_lmms_eval_reads(mode: str, demo: Path, tmp_path: Path) -> None:
    paths = export_lmms_eval(ExportConfig(dataset=str(demo), out=tmp_path, mode=mode))
    task = load_task(paths["yaml"])
    assert set(task) <= TASK_CONFIG_FIELDS
    name = "finer_demo_fine" + ("_choice" if mode == "choice" else "")
    assert task["task"] == name and paths["yaml"].name == f"{name}.yaml"
    assert task["output_type"] == "generate_until"
    assert task["test_split"] == "test"
    assert task["dataset_kwargs"] == {"load_from_disk": True}
    loaded = datasets.load_from_disk(task["dataset_path"])  # as lmms-eval loads it
    assert loaded[task["test_split"]].num_rows == 16
    assert paths["hooks"].name == f"{name}_hooks.py" and paths["hooks"].parent == paths["yaml"].parent
    hooks = import_hooks(paths["hooks"])
    for hook in HOOKS:
        assert isinstance(task[hook], _Function) and task[hook] == f"{name}_hooks.{hook}"
        assert callable(getattr(hooks, hook))
    generation = task["generation_kwargs"]
    assert generation["until"] == [] and generation["max_new_tokens"] == 128
    assert generation["do_sample"] is False and generation["temperature"] == 0
    assert [m["metric"] for m in task["metric_list"]] == list(METRICS[mode])
    assert all(m["aggregation"] == "mean" and m["higher_is_better"] is True for m in task["metric_list"])
    assert isinstance(task["metadata"], dict) and task["metadata"]["version"] == 1.0


def test_direct_hooks_on_rows(demo: Path, rows: list[dict[str, Any]], tmp_path: Path) -> None:
    hooks = import_hooks(export_lmms_eval(ExportConfig(dataset=str(demo), out=tmp_path))["hooks"])
    question = render("direct", level="fine")[0]["content"][1]["text"]
    for row in rows:
        messages = hooks.doc_to_messages(row)
        assert [m["role"] for m in messages] == ["user"]
        image, text = messages[0]["content"]
        assert image["type"] == "image" and isinstance(image["url"], Image.Image)
        assert image["url"].size == row["image"].size
        assert text == {"type": "text", "text": question}
        no_media = {k: v for k, v in row.items() if k != "image"}  # lmms-eval builds requests without images
        assert hooks.doc_to_text(no_media) == question
        assert [v.size for v in hooks.doc_to_visual(row)] == [row["image"].size]
        assert hooks.doc_to_target(row) == row["fine"][0]
        for answer in (f"Answer: {row['fine'][0]}", f"Answer: {row['fine'][1]}", "Answer: a bird", ""):
            expected = score(answer, "fine", row["superordinate"], row["coarse"], row["fine"])
            scores = hooks.process_results(row, [answer])
            assert scores == {"modified_em": expected.em, "strict_em": expected.strict_em, "f1": expected.f1}
        assert hooks.process_results(row, [f"It is the {row['fine'][0].lower()}."])["modified_em"] == 1.0
        assert hooks.process_results(row, ["Answer: Bird"])["modified_em"] == 0.0


def test_coarse_level_keeps_hierarchical_credit(
    demo: Path, rows: list[dict[str, Any]], tmp_path: Path
) -> None:
    hooks = import_hooks(
        export_lmms_eval(ExportConfig(dataset=str(demo), out=tmp_path, level="coarse"))["hooks"]
    )
    row = rows[0]
    assert hooks.doc_to_target(row) == row["coarse"][0]
    assert hooks.process_results(row, [f"Answer: {row['fine'][0]}"])["modified_em"] == 1.0
    assert hooks.process_results(row, [f"Answer: {row['superordinate']}"])["modified_em"] == 0.0


def test_choice_hooks_ask_what_finer_eval_asks(
    demo: Path, rows: list[dict[str, Any]], tmp_path: Path
) -> None:
    hooks = import_hooks(
        export_lmms_eval(ExportConfig(dataset=str(demo), out=tmp_path, mode="choice"))["hooks"]
    )
    _, concepts = load_split(str(demo), "test", ["image"])
    for row in rows:
        options, gold = choice_options(row, "fine", concepts, 5, 0)  # as `finer eval --mode choice`
        text = hooks.doc_to_messages(row)[0]["content"][1]["text"]
        assert all(f"({chr(65 + i)}) {option}\n" in text for i, option in enumerate(options))
        assert hooks.doc_to_target(row) == gold
        wrong = next(letter for letter in "ABCDE" if letter != gold)
        assert hooks.process_results(row, [f"Answer: ({gold})"]) == {"accuracy": 1.0}
        assert hooks.process_results(row, [f"Answer: ({wrong})"]) == {"accuracy": 0.0}
        assert hooks.process_results(row, [f"Answer: {gold} or {wrong}"]) == {"accuracy": 0.0}  # a hedge


def test_hub_repo_is_loaded_by_name(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    local = load_split(str(demo), "test", ["image"])
    monkeypatch.setattr("finer.eval.engine.load_split", lambda dataset, split, columns: local)
    code, out, _ = run_cli(
        ["export-lmms-eval", "--dataset", "someone/finer-demo", "--out", str(tmp_path)], capsys
    )
    assert code == 0 and "--tasks finer_demo_fine --include_path" in out
    task = load_task(tmp_path / "finer_demo_fine.yaml")
    assert task["dataset_path"] == "someone/finer-demo" and "dataset_kwargs" not in task


def test_bad_input_is_one_line(demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    no_fine = tmp_path / "no-fine"
    datasets.load_from_disk(str(demo)).remove_columns("fine").save_to_disk(no_fine)
    capsys.readouterr()
    cases = [
        (["--dataset", str(demo), "--split", "train"], "has no split 'train'"),
        (["--dataset", str(no_fine)], "lacks column(s) fine"),
        (["--dataset", str(demo), "--task", "a b"], "--task 'a b'"),
        (["--dataset", str(demo), "--mode", "choice", "--level", "superordinate"], "a single superordinate"),
    ]
    for args, message in cases:
        code, _, err = run_cli(["export-lmms-eval", *args, "--out", str(tmp_path / "out")], capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not (tmp_path / "out").exists()
    for mode, level in (("attrseek", "fine"), ("direct", "all")):
        with pytest.raises(FinerError, match="one question per document|one task asks one level"):
            export_lmms_eval(ExportConfig(dataset=str(demo), out=tmp_path / "out", mode=mode, level=level))


def test_tasks_sharing_a_folder_keep_their_own_level(
    demo: Path, rows: list[dict[str, Any]], tmp_path: Path
) -> None:
    """Two exports into one --out: the fine task must still score at the fine level (it was scored at the
    coarse level once the coarse export rewrote a shared settings file)."""
    fine = export_lmms_eval(ExportConfig(dataset=str(demo), out=tmp_path, level="fine"))
    coarse = export_lmms_eval(ExportConfig(dataset=str(demo), out=tmp_path, level="coarse"))
    assert len({fine["hooks"], coarse["hooks"], fine["settings"], coarse["settings"]}) == 4
    fine_hooks, coarse_hooks = import_hooks(fine["hooks"]), import_hooks(coarse["hooks"])
    row = rows[0]
    group = f"Answer: {row['coarse'][0]}"
    assert fine_hooks.process_results(row, [group])["modified_em"] == 0.0
    assert coarse_hooks.process_results(row, [group])["modified_em"] == 1.0
    assert (
        fine_hooks.doc_to_target(row) == row["fine"][0]
        and coarse_hooks.doc_to_target(row) == row["coarse"][0]
    )
    assert load_task(fine["yaml"])["doc_to_text"] == "finer_demo_fine_hooks.doc_to_text"


def test_hooks_take_lmms_eval_specific_kwargs(demo: Path, rows: list[dict[str, Any]], tmp_path: Path) -> None:
    """As lmms-eval 0.7 calls them (lmms_eval/api/task.py): a second positional argument when the task has
    `lmms_eval_specific_kwargs`, `doc_to_text` as a keyword always, `process_results` with `full_docs`."""
    hooks = import_hooks(export_lmms_eval(ExportConfig(dataset=str(demo), out=tmp_path))["hooks"])
    row, kwargs = rows[0], {"default": {}, "pre_prompt": ""}
    text = hooks.doc_to_text(row)
    assert hooks.doc_to_text(row, kwargs) == text == hooks.doc_to_text(row, lmms_eval_specific_kwargs=None)
    assert len(hooks.doc_to_visual(row, kwargs)) == 1
    assert hooks.doc_to_messages(row, lmms_eval_specific_kwargs=kwargs) == hooks.doc_to_messages(row)
    assert hooks.doc_to_target(row, kwargs) == row["fine"][0]
    assert hooks.process_results(row, [f"Answer: {row['fine'][0]}"], full_docs=rows)["modified_em"] == 1.0


def test_run_hint_and_yaml_say_what_a_cpu_run_and_the_dataset_path_need(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(["export-lmms-eval", "--dataset", str(demo), "--out", str(tmp_path)], capsys)
    assert code == 0
    cpu = "--model_args pretrained=ID,device=cpu,device_map=cpu"
    assert f"{cpu} --tasks finer_demo_fine --include_path {tmp_path}" in out
    text = (tmp_path / "finer_demo_fine.yaml").read_text()
    assert "device=cpu,device_map=cpu" in text and "dataset_path is absolute" in text
    assert Path(load_task(tmp_path / "finer_demo_fine.yaml")["dataset_path"]).is_absolute()


def test_task_names_that_share_a_module_name_are_refused(demo: Path, tmp_path: Path) -> None:
    export_lmms_eval(ExportConfig(dataset=str(demo), out=tmp_path, task="birds.fine"))
    with pytest.raises(FinerError, match="holds task 'birds.fine'"):
        export_lmms_eval(ExportConfig(dataset=str(demo), out=tmp_path, task="birds_fine"))
    export_lmms_eval(
        ExportConfig(dataset=str(demo), out=tmp_path, task="birds.fine", level="coarse")
    )  # again
