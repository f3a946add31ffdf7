"""Multiple choice with mined hard negatives: a tiny random-weight CLIP embeds the demo's classes, the stored
neighbours are the nearest by embeddings computed here independently, the store is reused without the model,
the seed fixes option order, and siblings / random / clip run from the command line into one comparison."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

from finer.data.build import BuildConfig, build
from finer.errors import FinerError
from finer.eval import distractors
from finer.eval.distractors import blocked_nearest, mine_neighbours
from finer.eval.engine import LABEL_COLUMNS, EvalConfig, evaluate, load_split
from finer.eval.lmms_eval import ExportConfig, LmmsTask, export_lmms_eval
from finer.eval.tasks import EvalPlan, LabelPool, choice_question
from finer.records import read_metrics_file
from finer.testing.fake_openai import FakeOpenAI
from finer.testing.tiny_parts import tiny_clip_path
from tests.cli_helpers import run_cli


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "demo"
    build(BuildConfig(source="demo", out=out, splits=["train", "test"], limit_per_class=2))
    return out


@pytest.fixture
def demo(built: Path, tmp_path: Path) -> Path:
    """A fresh copy of the demo: each test starts without stored neighbours."""
    return Path(shutil.copytree(built, tmp_path / "demo"))


@pytest.fixture(autouse=True)
def _no_endpoint_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def concepts_of(dataset: Path) -> list[dict[str, Any]]:
    return load_split(str(dataset), "test", list(LABEL_COLUMNS))[1]


def no_model(*args: Any) -> Any:
    raise AssertionError("the encoder was loaded")


# --- the neighbours -----------------------------------------------------------------------------------


def independent_embeddings(
    dataset: Path, concepts: list[dict[str, Any]], space: str
) -> dict[str, np.ndarray]:
    """Each fine label's embedding, computed here from the checkpoint without finer's mining code."""
    path = tiny_clip_path()
    model = AutoModel.from_pretrained(path).eval()
    tokenizer, processor = AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)
    first = {}
    for concept in concepts:
        first.setdefault(concept["fine"][0], concept["coarse"][0])
    labels = sorted(first, key=str.lower)
    texts = [f"a photo of a {label}, a type of {first[label]}" for label in labels]
    with torch.no_grad():
        inputs = tokenizer(texts, padding=True, return_tensors="pt")
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        text = torch.nn.functional.normalize(text.pooler_output, dim=1).numpy()
    if space == "text":
        return dict(zip(labels, text, strict=True))
    train = datasets.load_from_disk(str(dataset))["train"]
    vectors = {}
    for label, t in zip(labels, text, strict=True):
        images = [row["image"].convert("RGB") for row in train if row["fine"][0] == label]
        with torch.no_grad():
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            each = torch.nn.functional.normalize(model.get_image_features(pixel_values=pixels).pooler_output)
        mean = each.mean(0).numpy()
        mean /= np.linalg.norm(mean)
        vectors[label] = mean + t if space == "both" else mean
        vectors[label] /= np.linalg.norm(vectors[label])
    return vectors


def nearest(vectors: dict[str, np.ndarray]) -> dict[str, list[tuple[str, float]]]:
    """Every other label by cosine similarity, nearest first: a brute-force loop over the pairs."""
    table = {}
    for label, vector in vectors.items():
        others = [(other, float(vector @ v)) for other, v in vectors.items() if other != label]
        table[label.lower()] = sorted(others, key=lambda entry: -entry[1])
    return table


@pytest.mark.parametrize("space", ["text", "both"])
def test_neighbours_are_the_nearest_by_embeddings_computed_here(space: str, demo: Path) -> None:
    concepts = concepts_of(demo)
    mined = mine_neighbours(str(demo), concepts, model=str(tiny_clip_path()), space=space, device="cpu")
    vectors = independent_embeddings(demo, concepts, space)
    expected = nearest(vectors)
    assert set(mined.levels["fine"]) == set(expected) and len(expected) == 8
    for label, neighbours in expected.items():
        got = mined.levels["fine"][label]
        assert [name for name, _ in got] == [name for name, _ in neighbours]
        assert np.allclose([s for _, s in got], [s for _, s in neighbours], atol=1e-5)
    # The coarse level: each group the normalised mean of its species.
    groups: dict[str, list[np.ndarray]] = {}
    for concept in concepts:
        groups.setdefault(concept["coarse"][0], []).append(vectors[concept["fine"][0]])
    means = {group: np.mean(v, axis=0) / np.linalg.norm(np.mean(v, axis=0)) for group, v in groups.items()}
    coarse = nearest(means)
    assert {k: [n for n, _ in v] for k, v in mined.levels["coarse"].items()} == {
        k: [n for n, _ in v] for k, v in coarse.items()
    }
    # What is stored: the model, its revision, the settings, and the embeddings themselves.
    stored = json.loads(mined.path.read_text())
    assert mined.path.parent == demo / "distractors" and mined.revision == stored["revision"] == "local"
    assert stored["model"] == str(tiny_clip_path()) and stored["settings"]["space"] == space
    embeddings = load_file(str(mined.path.with_suffix(".safetensors")))["fine"].numpy()
    order = LabelPool.of(concepts, "fine").labels
    assert np.allclose(embeddings, np.stack([vectors[label] for label in order]), atol=1e-5)
    if space == "both":
        assert stored["source"]["images"] == 16  # two train images per species


def test_blocked_nearest_matches_one_block_and_skips_itself() -> None:
    vectors = torch.randn(50, 8)
    whole = blocked_nearest(vectors, 10, block=1000)
    blocks = blocked_nearest(vectors, 10, block=7)
    assert torch.equal(whole[0], blocks[0]) and torch.allclose(whole[1], blocks[1])
    assert not (whole[0] == torch.arange(50)[:, None]).any()
    normal = torch.nn.functional.normalize(vectors, dim=1)
    assert torch.allclose(whole[1][:, 0], (normal @ normal.T).fill_diagonal_(-2).max(1).values, atol=1e-6)


# --- the store ----------------------------------------------------------------------------------------


def test_the_stored_neighbours_are_reused_without_the_model(
    demo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    concepts = concepts_of(demo)
    clip = str(tiny_clip_path())
    first = mine_neighbours(str(demo), concepts, model=clip, device="cpu")
    assert not first.reused
    monkeypatch.setattr(distractors, "load_encoder", no_model)
    again = mine_neighbours(str(demo), concepts, model=clip, device="cpu")
    assert again.reused and again.levels == first.levels and again.path == first.path
    # Other settings or other concepts are other questions: they need the model.
    with pytest.raises(AssertionError, match="encoder was loaded"):
        mine_neighbours(str(demo), concepts, model=clip, space="image", device="cpu")
    with pytest.raises(AssertionError, match="encoder was loaded"):
        mine_neighbours(str(demo), concepts[:-1], model=clip, device="cpu")


def test_other_train_images_are_mined_again(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    concepts, clip = concepts_of(demo), str(tiny_clip_path())
    mine_neighbours(str(demo), concepts, model=clip, space="both", device="cpu")
    fewer = tmp_path / "fewer"
    splits = datasets.load_from_disk(str(demo))
    datasets.DatasetDict({"train": splits["train"].select(range(15)), "test": splits["test"]}).save_to_disk(
        fewer
    )
    for name in ("concepts.jsonl", "distractors"):
        (shutil.copytree if name == "distractors" else shutil.copy)(demo / name, fewer / name)
    monkeypatch.setattr(distractors, "load_encoder", no_model)
    assert mine_neighbours(str(demo), concepts, model=clip, space="both").reused
    with pytest.raises(AssertionError, match="encoder was loaded"):
        mine_neighbours(str(fewer), concepts, model=clip, space="both")


def _publish(folder: Path, cache: Path, repo_id: str, commit: str) -> None:
    """``folder`` as huggingface_hub's cache holds a download of ``commit`` (refs/main pointing at it)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def _use_cache(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))


def test_a_new_model_revision_is_mined_again_an_absent_model_reuses(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By repo id: the commit in the Hub cache is recorded; a new commit means new neighbours; a user without
    the model downloaded gets the stored ones."""
    concepts, repo = concepts_of(demo), "someone/tiny-clip"
    cache = tmp_path / "hub"
    _publish(tiny_clip_path(), cache, repo, "a" * 40)
    _use_cache(monkeypatch, cache)
    mined = mine_neighbours(str(demo), concepts, model=repo, device="cpu")
    assert mined.revision == "a" * 40 and not mined.reused
    monkeypatch.setattr(distractors, "load_encoder", no_model)
    assert mine_neighbours(str(demo), concepts, model=repo).reused
    _use_cache(monkeypatch, tmp_path / "empty")  # another user, the model not downloaded
    other = mine_neighbours(str(demo), concepts, model=repo)
    assert other.reused and other.revision == "a" * 40 and other.levels == mined.levels
    _publish(tiny_clip_path(), cache, repo, "b" * 40)
    _use_cache(monkeypatch, cache)
    with pytest.raises(AssertionError, match="encoder was loaded"):
        mine_neighbours(str(demo), concepts, model=repo)


# --- the questions ------------------------------------------------------------------------------------

ROW = {"source": "demo", "image_id": "i0", "superordinate": "Bird", "coarse": ["Oriole"], "fine": ["Gold"]}
POOL = [
    {"superordinate": "Bird", "coarse": [coarse], "fine": [fine]}
    for coarse, fine in [
        ("Oriole", "Gold"),
        ("Oriole", "Orchard"),
        ("Tanager", "Scarlet"),
        ("Tanager", "Summer"),
    ]
    + [("Wren", f"Wren {i}") for i in range(6)]
]


def test_clip_takes_the_nearest_ties_and_order_by_the_seed() -> None:
    neighbours = {
        "gold": [("Summer", 0.9), ("Wren 0", 0.8), ("Wren 1", 0.8), ("Wren 2", 0.8), ("Wren 3", 0.8)]
        + [("Scarlet", 0.1)]
    }
    pool = LabelPool.of(POOL, "fine")
    questions = [
        choice_question(ROW, "fine", pool, 4, seed, distractors="clip", neighbours=neighbours)
        for seed in range(12)
    ]
    for q in questions:
        assert q.options[ord(q.answer) - 65] == "Gold" and q.kinds[ord(q.answer) - 65] == "gold"
        by_option = dict(zip(q.options, zip(q.kinds, q.similarity, strict=True), strict=True))
        assert by_option["Summer"] == ("clip", 0.9)  # the nearest is always in
        wrens = [o for o in q.options if o.startswith("Wren")]
        assert len(wrens) == 2 and all(by_option[w] == ("clip", 0.8) for w in wrens)
        assert "Scarlet" not in q.options
    assert len({frozenset(q.options) for q in questions}) > 1  # the seed breaks the four-way tie
    assert len({tuple(q.options) for q in questions}) > len({frozenset(q.options) for q in questions})
    again = choice_question(ROW, "fine", pool, 4, 5, distractors="clip", neighbours=neighbours)
    assert again == questions[5]  # the seed fixes which and in what order
    # Too few neighbours: the rest are random, and say so.
    short = choice_question(
        ROW, "fine", pool, 5, 0, distractors="clip", neighbours={"gold": [("Summer", 0.9)]}
    )
    assert sorted(short.kinds) == ["clip", "gold", "random", "random", "random"]


def test_siblings_and_random_say_which_is_which() -> None:
    pool = LabelPool.of(POOL, "fine")
    siblings = choice_question(ROW, "fine", pool, 4, 0)
    assert dict(zip(siblings.options, siblings.kinds, strict=True))["Orchard"] == "sibling"
    assert sorted(siblings.kinds) == ["gold", "random", "random", "sibling"]
    assert siblings.similarity == [None] * 4
    kinds = {
        k
        for seed in range(20)
        for k in choice_question(ROW, "fine", pool, 4, seed, distractors="random").kinds
    }
    assert kinds == {"gold", "random"}
    with pytest.raises(FinerError, match="--distractors nearest"):
        choice_question(ROW, "fine", pool, 4, 0, distractors="nearest")


def test_the_seed_fixes_the_option_order_of_mined_questions(demo: Path) -> None:
    concepts = concepts_of(demo)
    mined = mine_neighbours(str(demo), concepts, model=str(tiny_clip_path()), device="cpu")
    rows = load_split(str(demo), "test", list(LABEL_COLUMNS))[0].remove_columns("image").to_list()

    def asked(seed: int) -> list[dict[str, Any]]:
        run = {"mode": "choice", "gold_parent": False, "choices": 4, "seed": seed, "distractors": "clip"}
        plan = EvalPlan(run=run, concepts=concepts, images=None, neighbours=mined.levels)
        return [plan.task(i, row, "fine").record for i, row in enumerate(rows)]

    first, same, other = asked(0), asked(0), asked(1)
    assert [r["options"] for r in first] == [r["options"] for r in same]
    assert [r["options"] for r in first] != [r["options"] for r in other]
    for record in first:
        gold = record["fine"][0]
        nearest3 = [label for label, _ in mined.levels["fine"][gold.lower()][:3]]
        assert sorted(record["options"]) == sorted([gold, *nearest3])  # no ties among random embeddings
        assert record["option_kinds"].count("clip") == 3
        sims = dict(zip(record["options"], record["option_similarity"], strict=True))
        assert sims[gold] is None and all(sims[n] == s for n, s in mined.levels["fine"][gold.lower()][:3])


# --- end to end ---------------------------------------------------------------------------------------


def answer_a(request: dict[str, Any]) -> str:
    return "Answer: A"


def test_three_kinds_from_the_cli_reuse_and_compare(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    demo = tmp_path / "demo"
    code, _, err = run_cli(["build", "demo", "--out", str(demo), "--limit-per-class", "2"], capsys)
    assert code == 0, err
    clip = str(tiny_clip_path())
    with FakeOpenAI(answer_a) as server:
        base = ["eval", "--dataset", str(demo), "--mode", "choice", "--choices", "4", "--backend", "openai"]
        base += ["--model", "m", "--base-url", server.url]
        for kind in ("siblings", "random", "clip"):
            extra = ["--distractor-model", clip] if kind == "clip" else []
            code, out, err = run_cli(
                [*base, "--distractors", kind, *extra, "--out", str(tmp_path / kind)], capsys
            )
            assert code == 0, err
        asked = len(server.requests)
        monkeypatch.setattr(distractors, "load_encoder", no_model)
        code, out, err = run_cli(
            [*base, "--distractors", "clip", "--distractor-model", clip, "--out", str(tmp_path / "clip")],
            capsys,
        )
        assert code == 0 and "asked 0" in out and len(server.requests) == asked  # resumed, nothing mined
    records = {
        kind: [json.loads(line) for line in (tmp_path / kind / "predictions.jsonl").read_text().splitlines()]
        for kind in ("siblings", "random", "clip")
    }
    assert {k for r in records["siblings"] for k in r["option_kinds"]} == {"gold", "sibling", "random"}
    assert {k for r in records["random"] for k in r["option_kinds"]} == {"gold", "random"}
    assert {k for r in records["clip"] for k in r["option_kinds"]} == {"gold", "clip"}
    assert "distractors" not in records["siblings"][0]["run"]  # earlier runs keep their keys
    assert records["clip"][0]["run"]["distractor_revision"] == "local"
    report = (tmp_path / "clip" / "report.md").read_text()
    assert "## multiple choice: distractors chosen" in report
    metrics = read_metrics_file(tmp_path / "clip")
    fine = metrics["runs"][0]["levels"]["fine"]
    chosen_wrong = sum(r["answer"] != "A" for r in records["clip"] if r["level"] == "fine")
    assert fine["distractor_kinds"] == {"clip": {"offered": 3 * fine["count"], "chosen": chosen_wrong}}
    code, table, _ = run_cli(
        ["compare", *(str(tmp_path / k) for k in ("siblings", "random", "clip"))], capsys
    )
    assert code == 0
    assert "| model | options | level | siblings | random | clip |" in table
    accuracy = {
        kind: sum(r["answer"] == "A" for r in rows if r["level"] == "fine") / 16
        for kind, rows in records.items()
    }
    row = "| m | 4 | fine | " + " | ".join(f"{accuracy[k]:.3f} (n=16)" for k in accuracy) + " |"
    assert row in table.splitlines()


def test_lmms_eval_export_asks_the_mined_questions(demo: Path, tmp_path: Path) -> None:
    clip = str(tiny_clip_path())
    paths = export_lmms_eval(
        ExportConfig(
            dataset=str(demo), out=tmp_path / "task", mode="choice", distractors="clip", distractor_model=clip
        )
    )
    settings = json.loads(paths["settings"].read_text())
    assert paths["yaml"].stem.endswith("_choice_clip") and settings["distractors"]["distractors"] == "clip"
    task = LmmsTask(settings)
    evaluate(
        EvalConfig(
            dataset=str(demo),
            out=tmp_path / "eval",
            model="m",
            mode="choice",
            level="fine",
            distractors="clip",
            distractor_model=clip,
        ),
        backend=Answers(),
    )
    for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines():
        record = json.loads(line)
        doc = {k: record[k] for k in ("source", "image_id", "superordinate", "coarse", "fine")}
        assert task.question(doc).record["options"] == record["options"]


class Answers:
    """A backend that answers A to everything (no model)."""

    def run(self, tasks: Any, sink: Any) -> None:
        from finer.models.backends import Generation

        for task in tasks:
            sink.done(task, [Generation("Answer: A", False)])


def test_bad_distractor_options_are_one_line(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["eval", "--dataset", str(demo), "--model", "m", "--out", str(tmp_path / "o")]
    code, _, err = run_cli([*base, "--distractors", "random"], capsys)
    assert code == 2 and "--distractors random needs --mode choice" in err and len(err.splitlines()) == 1
    missing = str(tmp_path / "no-such-clip")
    code, _, err = run_cli(
        [*base, "--mode", "choice", "--distractors", "clip", "--distractor-model", missing], capsys
    )
    assert code == 2 and "cannot load --distractor-model" in err and len(err.splitlines()) == 1
    image = ["--mode", "choice", "--distractors", "clip", "--distractor-space", "image"]
    image += ["--distractor-model", str(tiny_clip_path()), "--model", "m", "--out", str(tmp_path / "o")]
    test_only = _no_train(demo, tmp_path)
    capsys.readouterr()  # the save's progress bar
    code, _, err = run_cli(["eval", "--dataset", str(test_only), *image], capsys)
    assert code == 2 and "reads the train images" in err and len(err.splitlines()) == 1


def _no_train(demo: Path, tmp_path: Path) -> Path:
    out = tmp_path / "test-only"
    datasets.DatasetDict({"test": datasets.load_from_disk(str(demo))["test"]}).save_to_disk(str(out))
    shutil.copy(demo / "concepts.jsonl", out / "concepts.jsonl")
    return out


def test_grpo_choice_rows_take_the_mined_neighbours(demo: Path) -> None:
    from finer.train.grpo import grpo_dataset

    clip = str(tiny_clip_path())
    mined = mine_neighbours(str(demo), concepts_of(demo), model=clip, device="cpu")
    rows, _ = grpo_dataset(
        [str(demo)], fmt="choice", level="fine", choices=4, distractors="clip", distractor_model=clip
    )
    for options, fine in zip(rows["options"], rows["fine"], strict=True):
        nearest3 = [label for label, _ in mined.levels["fine"][fine[0].lower()][:3]]
        assert sorted(options) == sorted([fine[0], *nearest3])
