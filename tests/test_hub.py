"""hub.resolve without a network: local folders, the choice of files, offline and Hub failures in one line."""

import os
import socket
import subprocess
import sys
from unittest.mock import MagicMock

import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from huggingface_hub.hf_api import ModelInfo

from ventoux import hub
from ventoux.errors import VentouxError

REPO = "mistralai/Mistral-7B-v0.3"
# The top of mistralai/Mistral-7B-v0.3's file list: both layouts side by side.
V03_FILES = [".gitattributes", "README.md", "config.json", "consolidated.safetensors", "generation_config.json",
             "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
             "model-00003-of-00003.safetensors", "model.safetensors.index.json", "params.json",
             "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer.model.v3",
             "tokenizer_config.json"]


def listing(files):
    """HfApi.model_info's stand-in: the repo's files as the Hub lists them."""
    return lambda self, repo_id, **kw: ModelInfo(id=repo_id, siblings=[{"rfilename": f} for f in files])


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 with an empty cache of our own (constants are read when huggingface_hub is imported)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_local_folder_passes_through(tmp_path):
    assert hub.resolve(tmp_path) == tmp_path
    assert hub.resolve(str(tmp_path)) == tmp_path


def test_missing_local_path_and_file(tmp_path):
    with pytest.raises(VentouxError, match="no such folder: ./nope"):
        hub.resolve("./nope")
    with pytest.raises(VentouxError, match="no such folder: .*a/b/c"):
        hub.resolve(str(tmp_path / "a" / "b" / "c"))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(VentouxError, match="model.safetensors is a file; pass the checkpoint folder"):
        hub.resolve(str(tmp_path / "model.safetensors"))


@pytest.mark.parametrize("source, is_repo", [
    ("mistralai/Mistral-7B-v0.1", True), ("org/name.v2", True), ("./org/name", False), ("/abs/path", False),
    ("a/b/c", False), ("org/../x", False), ("name", False),
])
def test_looks_like_repo_id(source, is_repo):
    assert hub.looks_like_repo_id(source) == is_repo


def test_allow_patterns_pick_one_layout():
    hf = hub.allow_patterns(REPO, V03_FILES)
    assert "model-00003-of-00003.safetensors" in hf and "model.safetensors.index.json" in hf
    assert "consolidated.safetensors" not in hf and "tokenizer.model*" in hf and "config.json" in hf
    cons = hub.allow_patterns(REPO, ["params.json", "consolidated.safetensors", "consolidated.00.pth", "tekken.json"])
    assert "consolidated.safetensors" in cons and "consolidated.00.pth" not in cons and "params.json" in cons
    assert "consolidated.00.pth" in hub.allow_patterns(REPO, ["params.json", "consolidated.00.pth"])
    no_weights = hub.allow_patterns(REPO, V03_FILES, weights=False)
    assert not any("safetensors" in p for p in no_weights) and "config.json" in no_weights
    with pytest.raises(VentouxError, match=f"{REPO} has no Mistral weights"):
        hub.allow_patterns(REPO, ["config.json", "pytorch_model.bin"])


def test_download_asks_only_for_the_chosen_files(monkeypatch, tmp_path):
    calls = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", listing(V03_FILES))

    def fake_snapshot(repo_id, **kw):
        calls.update(kw, repo_id=repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert hub.resolve(REPO) == tmp_path
    assert calls["repo_id"] == REPO and not calls["local_files_only"]
    assert calls["allow_patterns"] == hub.allow_patterns(REPO, V03_FILES)


def test_offline_without_cache_says_so_in_one_line(offline):
    with pytest.raises(VentouxError) as e:
        hub.resolve(REPO)
    assert str(e.value) == (f"cannot download {REPO}: HF_HUB_OFFLINE=1 and it is not in the local cache; pass a "
                            "local folder or set HF_HUB_OFFLINE=0 when online")


def test_offline_uses_the_cached_snapshot(offline):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline / "models--mistralai--Mistral-7B-v0.3"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert hub.resolve(REPO).resolve() == snapshot.resolve()


def test_no_network(monkeypatch, tmp_path):
    class ConnectError(Exception):  # named like httpx's: what huggingface_hub lets through on a dead network
        pass

    def unreachable(self, repo_id, **kw):
        raise ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    with pytest.raises(VentouxError, match=f"^cannot download {REPO}: no network connection \\(offline\\?\\)"):
        hub.resolve(REPO)


@pytest.mark.parametrize("error, message", [
    (GatedRepoError("gated", response=MagicMock(status_code=403, headers={})), f"{REPO} is gated: accept its terms"),
    (RepositoryNotFoundError("nope", response=MagicMock(status_code=404, headers={})),
     f"no local folder {REPO} and no Hugging Face repo {REPO}"),
])
def test_gated_and_not_found(monkeypatch, error, message):
    def fail(self, repo_id, **kw):
        raise error

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", fail)
    with pytest.raises(VentouxError, match=message):
        hub.resolve(REPO)


def test_cli_info_offline_is_one_line(offline, capsys):
    from ventoux.cli import main

    assert main(["info", REPO]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HF_HUB_OFFLINE=1" in err and REPO in err


def test_cli_unreachable_hub_fails_fast_in_one_line(tmp_path):
    """The real download path against a closed local port, as with no network: one line, no backoff retries
    (list_repo_files retried for ~25 s, a "Retrying in Ns" line each)."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "ventoux", "info", REPO], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"ventoux: error: cannot download {REPO}: no network connection"), r.stderr
