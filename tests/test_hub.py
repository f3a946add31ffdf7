"""Publishing to the Hub: what would be uploaded (shards, embedded images, concepts, card); token safety.

No network: `FakeHub` replaces the far end of `HfApi` (the methods `push_to_hub` of datasets 5.2 and
huggingface_hub 2.4 really call) and `HfFileSystem._open` (how `push_to_hub` reads the card back).
Everything above them, `DatasetDict.push_to_hub` and `HfApi.upload_file` included, runs for real.
"""

from __future__ import annotations

import io
import json
import secrets
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import datasets
import httpx
import huggingface_hub
import pyarrow.parquet as pq
import pytest
import yaml
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, HfFileSystem
from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.hf_api import CommitInfo, RepoFile, RepoFolder, RepoUrl
from PIL import Image

from finer.builders import SOURCES, get_source
from finer.data.build import BuildConfig, build
from finer.errors import FinerError
from finer.hub.cards import dataset_card, size_category
from finer.hub.datasets import concept_dataset, push_dataset
from finer.schema import Concept, Knowledge, image_features

ENDPOINT = "https://huggingface.co"
SECRET = "hf_testSECRETx9Q2mZ7vL4kT8pW1"


def _response(status: int, url: str = f"{ENDPOINT}/api") -> httpx.Response:
    return httpx.Response(status, request=httpx.Request("POST", url))


class FakeHub:
    """Dataset repositories in memory: files, commits, visibility; records the token of every call."""

    def __init__(self) -> None:
        self.repos: dict[str, SimpleNamespace] = {}
        self.staged: dict[str, bytes] = {}
        self.calls: list[str] = []
        self.tokens: set[str | None] = set()
        self.commits: list[str] = []
        #: When set, the n-th create_commit (1-based) fails with 401, echoing the caller's token.
        self.fail_commit: int | None = None

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
        for name in ("create_repo", "repo_info", "preupload_lfs_files", "create_commit", "list_repo_tree"):
            monkeypatch.setattr(HfApi, name, self._method(name))
        monkeypatch.setattr(HfFileSystem, "_open", lambda fs, *args, **kwargs: self.open(fs, *args, **kwargs))
        return self

    def _method(self, name: str) -> Any:
        def method(api: HfApi, *args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            self.tokens.add(api.token)
            return getattr(self, name)(api, *args, **kwargs)

        return method

    def files(self, repo_id: str) -> dict[str, bytes]:
        return self.repos[repo_id].files

    # The far end of each HfApi method.

    def create_repo(self, api: HfApi, repo_id: str, *, repo_type: str, private: bool = False, **_: Any):
        assert repo_type == "dataset"
        self.repos.setdefault(
            repo_id, SimpleNamespace(private=bool(private), files={}, sha=secrets.token_hex(20))
        )
        return RepoUrl(f"{ENDPOINT}/datasets/{repo_id}", endpoint=ENDPOINT)

    def repo_info(self, api: HfApi, repo_id: str, *, repo_type: str, **_: Any) -> SimpleNamespace:
        assert repo_type == "dataset"
        if repo_id not in self.repos:
            raise RepositoryNotFoundError("404 Repository Not Found", response=_response(404))
        repo = self.repos[repo_id]
        return SimpleNamespace(id=repo_id, sha=repo.sha, private=repo.private)

    def preupload_lfs_files(self, api: HfApi, repo_id: str, additions: list, **_: Any) -> None:
        for addition in additions:  # datasets deletes the shard file right after this call
            with addition.as_file() as fh:
                self.staged[addition.path_in_repo] = fh.read()
            addition._upload_mode = "lfs"
            addition._is_uploaded = True

    def create_commit(
        self, api: HfApi, repo_id: str, operations: list, *, commit_message: str = "", **_: Any
    ) -> CommitInfo:
        self.commits.append(commit_message)
        if self.fail_commit == len(self.commits):
            raise HfHubHTTPError(
                f"401 Client Error: Unauthorized (token {api.token} is invalid)\n"
                f"Authorization: Bearer {api.token}",
                response=_response(401),
            )
        repo = self.repos[repo_id]
        for op in operations:
            if isinstance(op, CommitOperationAdd):
                if op._is_uploaded:
                    repo.files[op.path_in_repo] = self.staged.pop(op.path_in_repo)
                else:
                    with op.as_file() as fh:
                        repo.files[op.path_in_repo] = fh.read()
            elif isinstance(op, CommitOperationDelete):
                del repo.files[op.path_in_repo]
        repo.sha = secrets.token_hex(20)
        url = f"{ENDPOINT}/datasets/{repo_id}/commit/{repo.sha}"
        return CommitInfo(commit_url=url, commit_message=commit_message, commit_description="", oid=repo.sha)

    def list_repo_tree(self, api: HfApi, repo_id: str, path_in_repo: str | None = None, **kwargs: Any):
        files = self.files(repo_id)
        prefix = f"{path_in_repo.strip('/')}/" if path_in_repo else ""
        if prefix and not any(p.startswith(prefix) for p in files):
            raise RemoteEntryNotFoundError("404 Entry Not Found", response=_response(404))
        folders: set[str] = set()
        for path in sorted(p for p in files if p.startswith(prefix)):
            head, _, rest = path[len(prefix) :].partition("/")
            if rest and not kwargs.get("recursive"):
                if head not in folders:
                    folders.add(head)
                    yield RepoFolder(path=prefix + head, oid="0" * 40)
            else:
                yield RepoFile(path=path, size=len(files[path]), oid="0" * 40)

    def open(self, fs: HfFileSystem, path: str, mode: str = "rb", revision: str | None = None, **_: Any):
        resolved = fs.resolve_path(path, revision=revision)
        files = self.files(resolved.repo_id)
        if resolved.path_in_repo not in files:
            raise FileNotFoundError(path)
        return io.BytesIO(files[resolved.path_in_repo])


@pytest.fixture(autouse=True)
def no_stored_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No token from this machine's environment or login; temp files land under tmp_path for the scans."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    return FakeHub().install(monkeypatch)


@pytest.fixture(scope="module")
def demo_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "build"
    build(BuildConfig(source="demo", out=out, limit_per_class=1))
    return out


def _copy(build_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(build_dir, tmp_path / "build"))


def _imagefolder_build(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny `<root>/<split>/<class>/*.jpg` layout built with file-reference images; (root, build dir)."""
    root = tmp_path / "owls"
    colours = {
        "train/great_horned_owl/a.jpg": "brown",
        "train/barn_owl/b.jpg": "white",
        "test/barn_owl/c.jpg": "tan",
    }
    for relative, colour in colours.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 9), colour).save(root / relative, format="JPEG")
    out = tmp_path / "owls-build"
    build(BuildConfig(source="imagefolder", root=root, out=out, knowledge=False))
    return root, out


def _card(files: dict[str, bytes]) -> tuple[dict[str, Any], str]:
    """YAML metadata and body of an uploaded README.md."""
    text = files["README.md"].decode("utf-8")
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


def _table(files: dict[str, bytes], prefix: str):
    shards = [path for path in files if path.startswith(prefix) and path.endswith(".parquet")]
    assert len(shards) == 1, shards
    return pq.read_table(io.BytesIO(files[shards[0]]))


def test_push_demo_uploads_embedded_shards_concepts_and_card(demo_build: Path, hub: FakeHub) -> None:
    counts = json.loads((demo_build / "build.json").read_text())["counts"]

    url = push_dataset(demo_build, "me/finer-demo", private=True, token=SECRET)

    assert url == f"{ENDPOINT}/datasets/me/finer-demo"
    assert hub.repos["me/finer-demo"].private is True
    assert hub.tokens == {SECRET}
    assert hub.commits == [
        "finer: dataset card (demo)",
        "finer: demo images (16 rows)",
        "finer: demo concepts (8)",
    ]
    files = hub.files("me/finer-demo")
    assert sorted(files) == [
        "README.md",
        "concepts/train-00000-of-00001.parquet",
        "data/test-00000-of-00001.parquet",
        "data/train-00000-of-00001.parquet",
    ]
    for split, rows in counts.items():
        table = _table(files, f"data/{split}-")
        assert table.num_rows == rows
        features = datasets.Features.from_arrow_schema(table.schema)  # the schema datasets wrote
        assert (
            features["label"].names == sorted(features["label"].names) and len(features["label"].names) == 8
        )
        cells = table.column("image").to_pylist()
        assert all(cell["bytes"] for cell in cells)
        image = features["image"].decode_example(cells[0])
        image.load()
        assert image.width > 0

    concepts = _table(files, "concepts/train-")
    assert concepts.num_rows == 8
    row = concepts.to_pylist()[0]
    assert row["knowledge"]["status"] == "bundled" and row["knowledge"]["text"]
    assert row["attributes"]["required"] and row["taxonomy"]["family"]

    meta, body = _card(files)
    assert meta["license"] == "apache-2.0" and "license_name" not in meta
    assert meta["task_categories"] == ["image-classification", "visual-question-answering"]
    assert meta["tags"] == ["fine-grained", "finer", "demo"]
    assert meta["size_categories"] == ["n<1K"]
    configs = {c["config_name"]: c["data_files"] for c in meta["configs"]}
    assert configs == {
        "default": [{"split": "train", "path": "data/train-*"}, {"split": "test", "path": "data/test-*"}],
        "concepts": [{"split": "train", "path": "concepts/train-*"}],
    }
    infos = {info["config_name"]: info for info in meta["dataset_info"]}  # added by push_to_hub itself
    assert {s["name"]: s["num_examples"] for s in infos["default"]["splits"]} == counts
    assert "| train | 8 |" in body and "| test | 8 |" in body and "| **total** | **16** |" in body
    assert "Knowledge status | bundled 8" in body and "Attribute extractors | bundled 8" in body
    assert "@inproceedings{kim2024finer" in body and "2402.16315" in body
    assert 'load_dataset("me/finer-demo", "concepts", split="train")' in body
    assert str(demo_build) not in body


def test_push_again_keeps_one_card_with_both_configs(demo_build: Path, hub: FakeHub) -> None:
    push_dataset(demo_build, "me/finer-demo", token=SECRET)
    push_dataset(demo_build, "me/finer-demo", token=SECRET)

    files = hub.files("me/finer-demo")
    assert len(files) == 4
    meta, body = _card(files)
    assert sorted(c["config_name"] for c in meta["configs"]) == ["concepts", "default"]
    assert body.count("## How it was built") == 1


def test_push_embeds_file_reference_images(tmp_path: Path, hub: FakeHub) -> None:
    root, out = _imagefolder_build(tmp_path)
    stored = datasets.load_from_disk(str(out))["train"].data.column("image").to_pylist()
    assert all(cell["bytes"] is None and cell["path"] for cell in stored)  # the build holds references

    push_dataset(out, "me/owls", token=SECRET)

    files = hub.files("me/owls")
    assert hub.repos["me/owls"].private is False
    cells = _table(files, "data/train-").column("image").to_pylist()
    originals = {path.name: path.read_bytes() for path in root.rglob("*.jpg")}
    assert {cell["path"]: cell["bytes"] for cell in cells} == {
        name: data for name, data in originals.items() if name in ("a.jpg", "b.jpg")
    }
    Image.open(io.BytesIO(cells[0]["bytes"])).load()
    assert all(str(tmp_path).encode() not in data for data in files.values())  # no local paths leave
    assert "taxonomy" not in _table(files, "concepts/train-").column_names  # no ranks: no empty struct
    meta, body = _card(files)
    assert meta["license"] == "other" and meta["license_name"] == "unknown" and "license_link" not in meta
    assert "Unknown: finer cannot tell where these images came from" in body
    assert meta["tags"] == ["fine-grained", "finer", "imagefolder"]


def test_hub_failure_is_one_line_and_the_token_goes_nowhere(
    demo_build: Path,
    tmp_path: Path,
    hub: FakeHub,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    build_dir = _copy(demo_build, tmp_path)
    hub.fail_commit = 2  # the card is up; the image commit fails with a 401 that echoes the token

    with pytest.raises(FinerError) as caught:
        push_dataset(build_dir, "me/finer-demo")

    message = str(caught.value)
    assert hub.tokens == {SECRET}  # the token came from HF_TOKEN and was used
    assert SECRET not in message and "hf_test" not in message
    assert "\n" not in message
    assert message.startswith(f"pushing {build_dir} to me/finer-demo failed: HfHubHTTPError: 401")
    assert "hf auth login" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert SECRET not in hub.files("me/finer-demo")["README.md"].decode()
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path
    captured = capfd.readouterr()
    assert SECRET not in captured.out + captured.err + caplog.text


def test_no_token_is_a_one_line_error(demo_build: Path, hub: FakeHub) -> None:
    with pytest.raises(FinerError, match="no Hugging Face token: set HF_TOKEN"):
        push_dataset(demo_build, "me/finer-demo")
    assert hub.calls == []


@pytest.mark.parametrize("remove", [None, "build.json", "concepts.jsonl"])
def test_an_unfinished_build_is_refused(
    demo_build: Path, tmp_path: Path, hub: FakeHub, remove: str | None
) -> None:
    if remove is None:
        folder = tmp_path / "missing"
    else:
        folder = _copy(demo_build, tmp_path)
        (folder / remove).unlink()
    with pytest.raises(FinerError) as caught:
        push_dataset(folder, "me/x", token=SECRET)
    assert "\n" not in str(caught.value)
    assert ("not a folder" if remove is None else f"no {remove}") in str(caught.value)
    assert hub.calls == []


def test_a_missing_image_file_stops_before_the_hub(tmp_path: Path, hub: FakeHub) -> None:
    root, out = _imagefolder_build(tmp_path)
    (root / "test" / "barn_owl" / "c.jpg").unlink()
    with pytest.raises(FinerError, match=r"image file .*c\.jpg is missing"):
        push_dataset(out, "me/owls", token=SECRET)
    assert hub.calls == []


def test_inaturalist_images_stay_private(demo_build: Path, tmp_path: Path, hub: FakeHub) -> None:
    folder = _copy(demo_build, tmp_path)
    summary = json.loads((folder / "build.json").read_text())
    (folder / "build.json").write_text(json.dumps({**summary, "source": "inat2021"}))
    with pytest.raises(FinerError, match="inat2021: its terms forbid distributing the dataset images"):
        push_dataset(folder, "me/inat", token=SECRET)
    assert hub.calls == []

    push_dataset(folder, "me/inat", private=True, token=SECRET)
    meta, body = _card(hub.files("me/inat"))
    assert meta["license_name"] == "inaturalist-2021-terms"
    assert "keep this repository private" in body


def test_private_push_into_a_public_repo_is_refused(demo_build: Path, hub: FakeHub) -> None:
    hub.create_repo(None, "me/finer-demo", repo_type="dataset", private=False)  # type: ignore[arg-type]
    with pytest.raises(FinerError, match="already exists and is public"):
        push_dataset(demo_build, "me/finer-demo", private=True, token=SECRET)
    assert hub.files("me/finer-demo") == {} and hub.commits == []


def _card_for(source: str, rows: int, concepts: list[Concept] | None = None) -> tuple[dict[str, Any], str]:
    concepts = concepts or [Concept(concept_id="c", fine=["Barn Owl"], superordinate="Bird", coarse=["Owl"])]
    text = dataset_card(
        repo_id="me/x",
        build={"source": source, "counts": {"train": rows - rows // 2, "test": rows // 2}},
        built_on=datetime(2025, 1, 2, tzinfo=UTC),
        concepts=concepts,
        image_features=image_features(["Barn Owl"]),
        concept_features=concept_dataset(concepts).features,
    )
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


@pytest.mark.parametrize("source", SOURCES)
def test_every_source_card_names_its_licence_and_citations(source: str) -> None:
    terms = get_source(source).terms
    meta, body = _card_for(source, 12_000)
    assert meta["license"] == terms.license
    if terms.license == "other":
        assert meta["license_name"] == terms.license_name
        assert meta.get("license_link", "") == terms.license_link
    assert meta["size_categories"] == ["10K<n<100K"]
    assert meta["tags"][-1] == source
    assert terms.summary in body
    assert "@inproceedings{kim2024finer" in body
    assert (terms.citation in body) if terms.citation else body.count("```bibtex") == 1
    assert ("could not confirm these terms" in body) == (not terms.confirmed and bool(terms.license_link))
    assert "Built | 2025-01-02" in body


def test_card_credits_wikipedia_and_lists_models_and_template_hashes() -> None:
    concept = Concept(
        concept_id="c",
        fine=["Barn Owl"],
        superordinate="Bird",
        coarse=["Owl"],
        coarse_source="llm:coarse-model",
        knowledge=Knowledge(text="A pale owl.", status="found", url="https://en.wikipedia.org/wiki/Barn_owl"),
    )
    concept.attributes.extractor = "llm:attr-model"
    concept.attributes.prompt_sha256 = "ab" * 32
    _, body = _card_for("cub200", 10, [concept])
    assert "CC BY-SA 4.0" in body
    assert "| Models | `attr-model`, `coarse-model` |" in body
    assert f"`{'ab' * 32}` (llm:attr-model, 1 concepts)" in body


@pytest.mark.parametrize(
    ("rows", "category"),
    [(0, "n<1K"), (999, "n<1K"), (1_000, "1K<n<10K"), (99_999, "10K<n<100K"), (2_700_000, "1M<n<10M")],
)
def test_size_category(rows: int, category: str) -> None:
    assert size_category(rows) == category
