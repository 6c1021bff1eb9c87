"""Checkpoints built on the embedded backbones name them portably (any installation resolves them), and a push
refuses a checkpoint whose backbones are paths on this machine."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import save_tiny_llm, save_tiny_vision

from mmadapters import LavinForConditionalGeneration, LavinProcessor
from mmadapters.hub import push_folder
from mmadapters.hub.push import PushError
from mmadapters.modeling.embedded import EMBEDDED_SCHEME, SMOLLM2_DIR, VISION_DIR, embedded_backbones

IDS = torch.tensor([[1, 40, 50, 60]])


@pytest.fixture()
def embedded_cache(tmp_path, monkeypatch):
    """A stand-in embedded cache holding tiny backbones (the real ones are converted by the integration tests)."""
    cache = tmp_path / "cache-a"
    save_tiny_llm(cache / SMOLLM2_DIR)
    save_tiny_vision(cache / VISION_DIR)
    monkeypatch.setenv("MMADAPTERS_CACHE", str(cache))
    return cache


def test_embedded_backbones_are_recorded_by_portable_names(embedded_cache, tmp_path, monkeypatch):
    text_model, vision_model = embedded_backbones()
    model = LavinForConditionalGeneration.from_backbones(text_model, vision_model).eval()
    model.save_pretrained(
        tmp_path / "ckpt", processor=LavinProcessor.from_backbones(text_model, vision_model)
    )
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["text_backbone"]["name_or_path"] == EMBEDDED_SCHEME + SMOLLM2_DIR
    assert config["vision_backbone"]["name_or_path"] == EMBEDDED_SCHEME + VISION_DIR
    assert str(embedded_cache) not in (tmp_path / "ckpt" / "config.json").read_text()

    # "Another machine": the cache lives elsewhere; the checkpoint still loads, checked by fingerprint.
    other = tmp_path / "cache-b"
    shutil.copytree(embedded_cache, other)
    shutil.rmtree(embedded_cache)
    monkeypatch.setenv("MMADAPTERS_CACHE", str(other))
    loaded = LavinForConditionalGeneration.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=0, atol=0)
    assert LavinProcessor.from_pretrained(tmp_path / "ckpt") is not None
    # A portable checkpoint pushes without --allow-local-backbones.
    assert {f.path for f in push_folder(tmp_path / "ckpt", "me/lavin", dry_run=True)} >= {"config.json"}


def test_push_refuses_backbones_named_by_local_paths(tiny_backbones, tmp_path):
    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(PushError, match="path on this machine.*text_model='org/name'"):
        push_folder(tmp_path / "ckpt", "me/lavin", dry_run=True)
    planned = push_folder(
        tmp_path / "ckpt", "me/lavin", dry_run=True, allow_local_backbones=True, license="apache-2.0"
    )
    assert any(f.path == "mmadapters_model.safetensors" for f in planned)


def test_an_unknown_embedded_name_is_a_clear_error(tmp_path, embedded_cache):
    from mmadapters.modeling.embedded import resolve_backbone_name

    with pytest.raises(ValueError, match="does not ship"):
        resolve_backbone_name(EMBEDDED_SCHEME + "some-future-backbone")


def test_push_to_hub_takes_transformers_keywords(tiny_backbones, monkeypatch):
    from huggingface_hub import CommitInfo, HfApi, RepoUrl

    seen = {}

    def create_commit(self, repo_id, operations, **kwargs):
        seen.update(kwargs, files={op.path_in_repo: op.path_or_fileobj for op in operations})
        card = next(op for op in operations if op.path_in_repo == "README.md")
        with open(card.path_or_fileobj) as f:
            seen["card"] = f.read()
        return CommitInfo(
            commit_url="https://huggingface.co/org/lavin/commit/1111",
            commit_message="m",
            commit_description="",
            oid="1" * 40,
            pr_url="https://huggingface.co/org/lavin/discussions/1",
        )

    monkeypatch.setattr(
        HfApi, "create_repo", lambda self, repo_id, **k: RepoUrl(f"https://huggingface.co/{repo_id}")
    )
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "create_branch", lambda self, repo_id, **k: seen.update(branch=k["branch"]))
    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    url = model.push_to_hub(
        "org/lavin",
        create_pr=True,
        revision="dev",
        commit_description="why",
        tags=["scienceqa"],
        allow_local_backbones=True,
        license="apache-2.0",
        token="hf_x",
    )
    assert url == "https://huggingface.co/org/lavin/discussions/1"
    assert seen["create_pr"] is True and seen["revision"] == "dev" and seen["commit_description"] == "why"
    assert seen["branch"] == "dev"  # made first: a commit to a branch the repo lacks is refused
    assert "- scienceqa" in seen["card"]
    with pytest.raises(ValueError, match="more than max_shard_size='1KB'"):
        model.push_to_hub("org/lavin", max_shard_size="1KB", allow_local_backbones=True, license="apache-2.0")
    seen.clear()
    model.push_to_hub("org/lavin", max_shard_size="1GB", allow_local_backbones=True, license="apache-2.0")
    assert "mmadapters_model.safetensors" in seen["files"]  # one adapter file fits one shard


def test_processes_launched_together_set_the_embedded_backbones_up_once(tmp_path, monkeypatch):
    """Several processes started at once (torchrun, accelerate launch) each found no embedded backbones, each built
    them, and one's rename replaced the folder another was already reading from. Now one builds and the others
    wait for its copy (threads here: the lock is a file lock, which holds between threads as between processes)."""
    import threading
    import time

    from mmadapters.modeling import embedded

    builds = []

    def slow_build(folder):
        builds.append(folder.name)
        time.sleep(0.3)
        (folder / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(embedded, "_convert_smollm2", slow_build)
    monkeypatch.setattr(embedded, "_build_vision_tower", slow_build)
    monkeypatch.setenv("MMADAPTERS_CACHE", str(tmp_path / "cache"))
    results, errors = [], []

    def set_up():
        try:
            results.append(embedded_backbones())
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=set_up) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(builds) == 2, builds  # each backbone built once, by whichever process came first
    assert len(set(results)) == 1
    assert all(
        (tmp_path / "cache" / folder / "model.safetensors").is_file() for folder in (SMOLLM2_DIR, VISION_DIR)
    )


def test_embedded_cache_location_and_an_unwritable_one(tmp_path, monkeypatch):
    from mmadapters.modeling.embedded import cache_dir

    monkeypatch.delenv("MMADAPTERS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "mmadapters"  # where huggingface_hub puts its own cache too
    monkeypatch.setenv("MMADAPTERS_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("MMADAPTERS_CACHE", str(tmp_path / "a-file" / "cache"))
    with pytest.raises(OSError, match="cannot be created.*set MMADAPTERS_CACHE to a writable folder"):
        embedded_backbones()
