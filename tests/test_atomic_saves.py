"""Atomic saves: a save interrupted at any file leaves the old checkpoint loadable and nothing half-written."""

from __future__ import annotations

import builtins
import os

import pytest
import torch

from mmadapters import LavinForConditionalGeneration, LavinProcessor
from mmadapters.atomic import atomic_directory, is_internal, recover

IDS = torch.tensor([[1, 40, 50, 60, 70]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


class WriteFailure(RuntimeError):
    pass


def fail_at_write(monkeypatch, k: int) -> list[str]:
    """Make the k-th file write (Python's open for writing, or safetensors' save_file) raise, as a kill or a full
    disk would interrupt the save there."""
    import mmadapters.modeling.frozen_backbones as frozen_backbones

    count = {"writes": 0}
    seen: list[str] = []
    real_open, real_save_file = builtins.open, frozen_backbones.save_file

    def counted(path):
        count["writes"] += 1
        seen.append(os.path.basename(str(path)))
        if count["writes"] == k:
            raise WriteFailure(f"interrupted at write {k} ({path})")

    def open_(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax"):
            counted(file)
        return real_open(file, mode, *args, **kwargs)

    def save_file(tensors, filename, *args, **kwargs):
        counted(filename)
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(frozen_backbones, "save_file", save_file)
    return seen


def test_save_interrupted_at_every_write_keeps_the_old_checkpoint(
    tiny_backbones, tmp_path, randomize_adapters
):
    processor = LavinProcessor.from_backbones(*tiny_backbones)
    torch.manual_seed(0)
    old = randomize_adapters(LavinForConditionalGeneration.from_backbones(*tiny_backbones), seed=1).eval()
    new = randomize_adapters(LavinForConditionalGeneration.from_backbones(*tiny_backbones), seed=2).eval()
    folder = tmp_path / "ckpt"
    old.save_pretrained(folder, processor=processor)
    (folder / "README.md").write_text("my notes")
    files_before = {p.name: p.read_bytes() for p in folder.iterdir()}

    with pytest.MonkeyPatch.context() as patch:  # count the writes of one whole save
        writes = fail_at_write(patch, k=10_000)
        new.save_pretrained(tmp_path / "count", processor=processor)
    assert len(writes) >= 5, writes

    for k in range(1, len(writes) + 1):
        with pytest.MonkeyPatch.context() as patch:
            fail_at_write(patch, k)
            with pytest.raises(WriteFailure):
                new.save_pretrained(folder, processor=processor)
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == files_before, f"changed at write {k}"
        assert not [p for p in tmp_path.iterdir() if is_internal(p.name)], f"leftovers at write {k}"
    torch.testing.assert_close(logits(LavinForConditionalGeneration.from_pretrained(folder)), logits(old))

    new.save_pretrained(folder, processor=processor)  # uninterrupted: the new checkpoint, the README kept
    torch.testing.assert_close(logits(LavinForConditionalGeneration.from_pretrained(folder)), logits(new))
    assert (folder / "README.md").read_text() == "my notes"


def test_a_save_killed_between_its_renames_is_recovered(tiny_backbones, tmp_path):
    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones).eval()
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    # What the two-rename fallback leaves if killed after moving the old folder aside, plus a staging leftover.
    folder.rename(tmp_path / ".ckpt.previous-abc")
    (tmp_path / ".ckpt.staging-def").mkdir()
    loaded = LavinForConditionalGeneration.from_pretrained(folder)
    torch.testing.assert_close(logits(loaded), logits(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_full_save_over_adapter_checkpoint_drops_the_old_adapter_files(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "notes.txt"):
        (folder / name).write_text("old")
    with atomic_directory(folder) as staging:
        (staging / "config.json").write_text("{}")
        (staging / "model.safetensors").write_text("new")
    # A stale adapter_config.json next to full weights would make transformers take the folder for a PEFT adapter.
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]


def test_recover_leaves_unrelated_folders_alone(tmp_path):
    (tmp_path / ".other.staging-1").mkdir()
    (tmp_path / "ckpt").mkdir()
    recover(tmp_path / "ckpt")
    assert (tmp_path / ".other.staging-1").is_dir()


def test_recover_keeps_the_staging_folder_of_a_live_writer(tmp_path):
    (tmp_path / "ckpt").mkdir()
    live = tmp_path / f".ckpt.staging-{os.getppid()}-x"  # another process that is still writing
    dead = tmp_path / ".ckpt.staging-999999999-x"
    live.mkdir()
    dead.mkdir()
    recover(tmp_path / "ckpt")
    assert live.is_dir() and not dead.exists()


def test_a_full_disk_is_a_clear_error_and_keeps_the_old_checkpoint(tiny_backbones, tmp_path, monkeypatch):
    import errno

    import mmadapters.modeling.frozen_backbones as frozen_backbones
    from mmadapters.atomic import DiskFullError

    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones).eval()
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(frozen_backbones, "save_file", no_space)
    with pytest.raises(DiskFullError, match="disk is full.*previous content is intact"):
        model.save_pretrained(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_recipe_that_is_not_utf8_is_a_clear_error(tmp_path, capsys):
    from mmadapters.cli import main

    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"model: lavin\noutput_dir: \xff\xfe\n")
    assert main(["train", str(path)]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err


def test_processor_save_is_atomic_and_keeps_the_models_files(tiny_backbones, tmp_path, monkeypatch):
    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    processor = LavinProcessor.from_backbones(*tiny_backbones)
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    model_files = {p.name: p.read_bytes() for p in folder.iterdir()}
    saved = processor.save_pretrained(folder)
    assert all(os.path.dirname(path) == str(folder) for path in saved)
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert {k: after[k] for k in model_files} == model_files and "processor_config.json" in after
    # Interrupted: nothing changes.
    monkeypatch.setattr(builtins, "open", lambda *a, **k: (_ for _ in ()).throw(WriteFailure("stop")))
    with pytest.raises(WriteFailure):
        processor.save_pretrained(folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == after


def test_a_save_into_a_backbones_own_folder_is_refused_and_changes_nothing(tmp_path, monkeypatch):
    """save_pretrained into the folder a backbone was loaded from replaced that backbone's config.json and
    removed its weights (the checkpoint then could not load): refused before anything is written, however the
    folder is spelled, and a Trainer with that output folder is refused when it is built."""
    from conftest import make_trainer, save_tiny_llm, save_tiny_vision, toy_dataset

    llm, vision = save_tiny_llm(tmp_path / "llm"), save_tiny_vision(tmp_path / "vision")
    model = LavinForConditionalGeneration.from_backbones(llm, vision)
    processor = LavinProcessor.from_backbones(llm, vision)

    def snapshot(folder):
        return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}

    before = {role: snapshot(tmp_path / role) for role in ("llm", "vision")}
    monkeypatch.chdir(tmp_path)
    for folder, role in ((llm, "text"), (vision, "vision"), ("llm/", "text"), ("./vision", "vision")):
        with pytest.raises(ValueError, match=f"is the folder the {role} backbone was loaded from"):
            model.save_pretrained(folder, processor=processor)
    with pytest.raises(ValueError, match="is the folder the tokenizer was loaded from"):
        processor.save_pretrained("llm")
    with pytest.raises(ValueError, match="is the folder the text backbone was loaded from"):
        make_trainer(model, processor, toy_dataset(tmp_path, n=4), llm)
    assert {role: snapshot(tmp_path / role) for role in ("llm", "vision")} == before
    model.save_pretrained(tmp_path / "llm" / "adapters")  # a folder inside is fine
    LavinForConditionalGeneration.from_pretrained(tmp_path / "llm" / "adapters")
    # A processor loaded from a checkpoint saves back into it (its tokenizer's folder, but a processor's save).
    processor.save_pretrained(tmp_path / "checkpoint")
    LavinProcessor.from_pretrained(tmp_path / "checkpoint").save_pretrained(tmp_path / "checkpoint")
