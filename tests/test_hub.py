"""resolve_pretrained: local folders, a hand-built offline hub cache, and the MissingWeightsError message."""

import os
import pickle

import pytest

from t2mv.perflow.hub import MissingWeightsError, resolve_pretrained

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An HF hub cache with one repo, `fake-org/fake-model`, laid out as huggingface_hub writes it."""
    cache = tmp_path / "hub"
    repo = cache / "models--fake-org--fake-model"
    snapshot = repo / "snapshots" / COMMIT
    (snapshot / "unet").mkdir(parents=True)
    (snapshot / "unet" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_tests_run_offline():
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_local_folder_is_returned_as_is(tmp_path):
    assert resolve_pretrained(tmp_path) == tmp_path
    assert resolve_pretrained(str(tmp_path), local_files_only=False) == tmp_path


def test_cached_repo_resolves_offline(hub_cache):
    folder = resolve_pretrained("fake-org/fake-model", allow_patterns=["unet/*"])
    assert folder == hub_cache / "models--fake-org--fake-model" / "snapshots" / COMMIT
    assert (folder / "unet" / "config.json").is_file()
    assert resolve_pretrained("fake-org/fake-model", revision=COMMIT) == folder


def test_cached_repo_resolves_with_local_files_only_even_when_env_allows_network(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    folder = resolve_pretrained("fake-org/fake-model", local_files_only=True)
    assert folder.name == COMMIT


def test_missing_repo_raises_a_helpful_error(hub_cache):
    with pytest.raises(MissingWeightsError) as info:
        resolve_pretrained("fake-org/not-downloaded", allow_patterns=["*.json"])
    error = info.value
    assert isinstance(error, FileNotFoundError)
    message = str(error)
    assert "'fake-org/not-downloaded'" in message
    assert str(hub_cache) in message and "HF_HUB_CACHE" in message
    assert 'huggingface-cli download fake-org/not-downloaded --include "*.json"' in message
    assert "local folder" in message
    assert error.repo == "fake-org/not-downloaded" and error.cache_dir == hub_cache


def test_missing_revision_of_a_cached_repo_raises(hub_cache):
    with pytest.raises(MissingWeightsError, match="--revision v9"):
        resolve_pretrained("fake-org/fake-model", revision="v9")


@pytest.mark.parametrize("path", ["./no/such/folder", "/no/such/folder", "a/b/c"])
def test_missing_local_folder_raises(path, hub_cache):
    with pytest.raises(MissingWeightsError, match="no such local folder"):
        resolve_pretrained(path)


def test_a_file_is_not_a_model_folder(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(MissingWeightsError, match="pass the folder"):
        resolve_pretrained(file)


def test_error_survives_pickling():
    error = pickle.loads(pickle.dumps(MissingWeightsError("org/name", "gone")))
    assert error.repo == "org/name" and "gone" in str(error)
