"""Downloads (hub.py) where mutation testing (mutation/README.md, through mutation/fresh_module.sh) found them
unpinned: the repo id and weights flag handed to the Hub, the choice between layouts when one is incomplete,
each failure's whole message (HTTP status, a connection lost mid-download, a full disk), and empty or non-text
sources."""

from __future__ import annotations

from unittest.mock import MagicMock

import huggingface_hub
import pytest
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.hf_api import ModelInfo
from test_hub import REPO, V03_FILES

from ventoux import hub
from ventoux.errors import VentouxError

NO_WEIGHTS = (f"{REPO} has no Mistral weights ventoux can read (model.safetensors, its shards, "
              "consolidated.safetensors or consolidated.00.pth)")


def fake_hub(monkeypatch, files=V03_FILES, snapshot_error=None):
    calls = {}

    def model_info(self, repo_id, **kw):
        calls["listed"] = repo_id
        return ModelInfo(id=repo_id, siblings=[{"rfilename": f} for f in files])

    def snapshot_download(repo_id, **kw):
        if snapshot_error is not None:
            raise snapshot_error
        calls.update(kw, repo_id=repo_id)
        return "/snapshot"

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_the_hub_is_asked_for_the_repo_and_only_the_files_wanted(monkeypatch):
    calls = fake_hub(monkeypatch)
    assert str(hub.resolve(REPO, weights=False)) == "/snapshot"
    assert calls == {"listed": REPO, "repo_id": REPO, "allow_patterns": hub.allow_patterns(REPO, V03_FILES, False),
                     "local_files_only": False}
    assert not any("safetensors" in p for p in calls["allow_patterns"])


def test_a_repo_without_weights_is_named(monkeypatch):
    fake_hub(monkeypatch, files=["config.json", "pytorch_model.bin"])
    with pytest.raises(VentouxError) as e:
        hub.resolve(REPO)
    assert str(e.value) == NO_WEIGHTS


@pytest.mark.parametrize("files, chosen", [
    (["model.safetensors", "consolidated.safetensors"], ["model.safetensors"]),
    (["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "consolidated.safetensors"],
     ["consolidated.safetensors"]),                                  # shards without their index: incomplete
    ([hub.HF_INDEX, "consolidated.00.pth"], ["consolidated.00.pth"]),  # an index without shards: the same
])
def test_an_incomplete_layout_is_passed_over(files, chosen):
    assert hub.allow_patterns(REPO, files + ["params.json"]) == chosen + ["params.json", *hub.TOKENIZER_FILES]


@pytest.mark.parametrize("error, message", [
    (GatedRepoError("gated", response=MagicMock(status_code=403, headers={})),
     f"{REPO} is gated: accept its terms on https://huggingface.co/{REPO} and set HF_TOKEN to a token of that account"),
    (RepositoryNotFoundError("nope", response=MagicMock(status_code=404, headers={})),
     f"no local folder {REPO} and no Hugging Face repo {REPO} (or it is private: set HF_TOKEN); check the path or "
     "the repo id"),
    (HfHubHTTPError("busy", response=MagicMock(status_code=503, headers={})),
     f"cannot download {REPO}: the Hub answered HTTP 503; retry later or pass a local folder"),
    (HfHubHTTPError("odd", response=MagicMock(spec=["headers", "request"], headers={})),  # no status_code
     f"cannot download {REPO}: the Hub answered HTTP ?; retry later or pass a local folder"),
    (ConnectionError("reset by peer"), f"cannot download {REPO}: the connection failed (ConnectionError); retry "
                                       "when online or pass a local folder"),
    (OSError(28, "No space left on device"), f"cannot download {REPO}: [Errno 28] No space left on device; check "
                                             "disk space and HF_HOME, or pass a local folder"),
])
def test_each_download_failure_whole(monkeypatch, error, message):
    fake_hub(monkeypatch, snapshot_error=error)
    with pytest.raises(VentouxError) as e:
        hub.resolve(REPO)
    assert str(e.value) == message


def test_no_network_and_no_cache_whole(monkeypatch, tmp_path):
    from huggingface_hub import constants

    def unreachable(self, repo_id, **kw):
        raise TimeoutError("timed out")

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    with pytest.raises(VentouxError) as e:
        hub.resolve(REPO)
    assert str(e.value) == (f"cannot download {REPO}: no network connection (offline?) and it is not (fully) in the "
                            "local cache; pass a local folder or retry when online")


def test_a_repo_id_never_holds_two_dots():
    assert hub.looks_like_repo_id("org/a.b") and not hub.looks_like_repo_id("org/a..b")


@pytest.mark.parametrize("source", ["", "  ", 3, None])
def test_an_empty_or_non_text_source_is_refused_whole(source):
    with pytest.raises(VentouxError) as e:
        hub.resolve(source)
    assert str(e.value) == f"model source {source!r} is not a checkpoint folder or a Hugging Face repo id (org/name)"
