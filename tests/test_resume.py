"""Resume: `mmadapters train RECIPE --resume`, the recipe's `training.resume_from_checkpoint`, incomplete
checkpoints skipped, earlier checkpoints never silently overwritten, seeded initialisation; progress saved when a
run stops; `mmadapters quickstart --resume`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from mmadapters.cli import main


def write_recipe(tmp_path, tiny_backbones, name="recipe.yaml", output="run", **training):
    recipe = {
        "model": "lavin",
        "text_model": tiny_backbones[0],
        "vision_model": tiny_backbones[1],
        "adapter": {"dropout": 0.0},
        "data": {"name": "easy_vqa", "split": "train", "limit": 48},
        "output_dir": str(tmp_path / output),
        "training": {
            "max_steps": 6,
            "save_steps": 3,
            "per_device_train_batch_size": 4,
            "learning_rate": 5e-3,
            "lr_scheduler_type": "constant",  # the first 3 steps do not depend on max_steps
            "use_cpu": True,
            "seed": 0,
            "data_seed": 0,
            "dataloader_num_workers": 0,
            **training,
        },
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def final_weights(tmp_path, output="run"):
    return load_file(tmp_path / output / "final" / "mmadapters_model.safetensors")


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_cli_kill_and_resume_equals_an_uninterrupted_run(tiny_backbones, tmp_path, capsys):
    # The uninterrupted run.
    assert main(["train", str(write_recipe(tmp_path, tiny_backbones, output="full"))]) == 0
    uninterrupted = final_weights(tmp_path, "full")
    # Identical recipe, identical weights (the adapters are initialised under the recipe's seed).
    assert (
        main(["train", str(write_recipe(tmp_path, tiny_backbones, name="again.yaml", output="again"))]) == 0
    )
    assert_same(final_weights(tmp_path, "again"), uninterrupted)

    # The interrupted run: it stopped after checkpoint-3, and was killed while writing checkpoint-6.
    assert main(["train", str(write_recipe(tmp_path, tiny_backbones, max_steps=3))]) == 0
    shutil.rmtree(tmp_path / "run" / "final")
    partial = tmp_path / "run" / "checkpoint-6"
    shutil.copytree(tmp_path / "run" / "checkpoint-3", partial)
    (partial / "trainer_state.json").unlink()  # written last: its absence marks the kill
    recipe = write_recipe(tmp_path, tiny_backbones)
    capsys.readouterr()
    # Rerunning without --resume would start over and overwrite the checkpoints: refused.
    assert main(["train", str(recipe)]) == 2
    assert "--resume auto" in capsys.readouterr().err
    assert main(["train", str(recipe), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "Skipping the incomplete checkpoint" in out and "checkpoint-6" in out
    assert "Resuming from" in out and "checkpoint-3" in out
    assert_same(final_weights(tmp_path), uninterrupted)


def test_a_stopped_recipe_run_says_which_command_continues_it(tiny_backbones, tmp_path, capsys, monkeypatch):
    from mmadapters.trainers import LavinTrainer

    training_step = LavinTrainer.training_step

    def interrupted_at_step_5(self, *args, **kwargs):
        if self.state.global_step == 4:
            raise KeyboardInterrupt
        return training_step(self, *args, **kwargs)

    monkeypatch.setattr(LavinTrainer, "training_step", interrupted_at_step_5)
    recipe = write_recipe(tmp_path, tiny_backbones, name="my recipe.yaml")
    assert main(["train", str(recipe)]) == 130
    err = capsys.readouterr().err
    assert (
        f"saved in {tmp_path / 'run' / 'checkpoint-4'}. Continue with mmadapters train '{recipe}' --resume."
        in err
    )
    monkeypatch.undo()
    assert main(["train", str(recipe), "--resume"]) == 0
    assert "Resuming from" in capsys.readouterr().out


def test_recipe_resume_key_is_honoured(tiny_backbones, tmp_path, capsys):
    assert main(["train", str(write_recipe(tmp_path, tiny_backbones, max_steps=3))]) == 0
    recipe = write_recipe(
        tmp_path, tiny_backbones, resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3")
    )
    assert main(["train", str(recipe)]) == 0
    assert "Resuming from" in capsys.readouterr().out


@pytest.mark.parametrize("given", ["missing", "incomplete"])
def test_resume_from_a_bad_folder_is_a_clear_error(tiny_backbones, tmp_path, capsys, given):
    folder = tmp_path / "ckpt"
    if given == "incomplete":
        folder.mkdir()
        (folder / "mmadapters_model.safetensors").write_bytes(b"")
    assert main(["train", str(write_recipe(tmp_path, tiny_backbones)), "--resume", str(folder)]) == 2
    message = capsys.readouterr().err
    assert "Cannot resume from" in message and (
        "does not exist" in message or "trainer_state.json" in message
    )


def test_trainer_resume_true_skips_an_incomplete_last_checkpoint(tiny_backbones, tmp_path, caplog):
    from conftest import make_trainer, toy_dataset

    from mmadapters import LavinForConditionalGeneration, LavinProcessor

    processor = LavinProcessor.from_backbones(*tiny_backbones)
    dataset = toy_dataset(tmp_path)
    trainer = make_trainer(
        LavinForConditionalGeneration.from_backbones(*tiny_backbones),
        processor,
        dataset,
        tmp_path / "r",
        max_steps=3,
    )
    trainer.train()
    shutil.copytree(tmp_path / "r" / "checkpoint-3", tmp_path / "r" / "checkpoint-6")
    (tmp_path / "r" / "checkpoint-6" / "optimizer.pt").write_bytes(b"PK\x03\x04cut")  # killed mid-write
    resumed = make_trainer(
        LavinForConditionalGeneration.from_backbones(*tiny_backbones), processor, dataset, tmp_path / "r"
    )
    resumed.train(resume_from_checkpoint=True)
    assert "Skipping the incomplete checkpoint" in caplog.text and "optimizer.pt is truncated" in caplog.text
    assert resumed.state.global_step == 6


def test_load_best_model_at_end_restores_the_best_checkpoints_adapters(tiny_backbones, tmp_path):
    from conftest import make_trainer, toy_dataset

    from mmadapters import LavinForConditionalGeneration, LavinProcessor
    from mmadapters.checkpoint_files import ADAPTER_WEIGHTS_NAME

    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    dataset = toy_dataset(tmp_path, n=12)
    training = dict(
        per_device_eval_batch_size=4,
        eval_strategy="steps",
        eval_steps=2,
        save_steps=2,
        load_best_model_at_end=True,
        # "best" = the highest evaluation loss: the first checkpoint while the loss falls, so that loading it
        # visibly replaces the last weights.
        metric_for_best_model="loss",
        greater_is_better=True,
    )
    processor = LavinProcessor.from_backbones(*tiny_backbones)
    trainer = make_trainer(
        model, processor, dataset, tmp_path / "run", training=training, eval_dataset=dataset
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-2")
    saved = load_file(f"{best}/{ADAPTER_WEIGHTS_NAME}")
    last = load_file(str(tmp_path / "run" / "checkpoint-6" / ADAPTER_WEIGHTS_NAME))
    live = model.adapter_state_dict()
    assert any(not torch.equal(saved[name], last[name]) for name in saved)
    for name, tensor in saved.items():
        torch.testing.assert_close(live[name], tensor, rtol=0, atol=0, msg=name)


def rescue_setup(tmp_path, tiny_backbones, **training):
    """A LavinTrainer over the toy data in order (4 rows a step, a checkpoint every 3 steps) on a model initialised
    under seed 0."""
    from conftest import make_trainer, toy_dataset

    from mmadapters import LavinForConditionalGeneration, LavinProcessor

    data = tmp_path / "data"
    data.mkdir(parents=True, exist_ok=True)
    dataset = toy_dataset(str(data))
    torch.manual_seed(0)
    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    processor = LavinProcessor.from_backbones(*tiny_backbones)
    settings = dict(
        train_sampling_strategy="sequential", save_steps=3, lr_scheduler_type="constant", **training
    )
    return dataset, lambda **kwargs: make_trainer(
        model, processor, dataset, tmp_path / "run", **kwargs, training=settings
    )


def test_an_error_during_training_saves_the_steps_since_the_last_checkpoint(tiny_backbones, tmp_path):
    """An unreadable image in step 6's batch (read as step 5 begins; checkpoints every 3 steps) stopped the run and
    lost step 4; now the run writes checkpoint-4 as it stops, says so in the error, and resuming from it after the
    image is mended ends where an uninterrupted run ends."""
    from mmadapters import InvalidImageError

    dataset, trainer_for = rescue_setup(tmp_path / "uninterrupted", tiny_backbones)
    trainer_for().train()
    uninterrupted = load_file(
        tmp_path / "uninterrupted" / "run" / "checkpoint-6" / "mmadapters_model.safetensors"
    )

    dataset, trainer_for = rescue_setup(tmp_path, tiny_backbones)
    # Step 6 reads rows 20-23, collated as step 5 begins (accelerate reads one batch ahead).
    bad = dataset[21]["image"]
    good_bytes = open(bad, "rb").read()
    with open(bad, "wb") as f:
        f.write(b"not a png")
    with pytest.raises(InvalidImageError) as stopped:
        trainer_for().train()
    notes = "\n".join(getattr(stopped.value, "__notes__", []))
    assert "stopped after step 4" in notes and str(tmp_path / "run" / "checkpoint-4") in notes
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-3", "checkpoint-4"]

    with open(bad, "wb") as f:
        f.write(good_bytes)
    dataset, trainer_for = rescue_setup(tmp_path, tiny_backbones)
    trainer_for().train(resume_from_checkpoint=True)  # takes checkpoint-4, the last complete one
    assert_same(load_file(tmp_path / "run" / "checkpoint-6" / "mmadapters_model.safetensors"), uninterrupted)


class InterruptAt(TrainerCallback):
    """Ctrl-C at the end of step `step`, or just after its optimizer step (before the Trainer counts it)."""

    def __init__(self, event, step):
        self.event, self.step = event, step

    def on_step_end(self, args, state, control, **kwargs):
        if self.event == "step_end" and state.global_step == self.step:
            raise KeyboardInterrupt

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.event == "optimizer_step" and state.global_step + 1 == self.step:
            raise KeyboardInterrupt


def interrupted_run(tmp_path, tiny_backbones, event, step, hp_search_backend=None):
    """(the KeyboardInterrupt's notes, the checkpoints left) of a fresh run stopped by Ctrl-C at `event` of `step`."""
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
    _, trainer_for = rescue_setup(tmp_path, tiny_backbones, disable_tqdm=False)
    trainer = trainer_for(callbacks=[InterruptAt(event, step)])
    trainer.hp_search_backend = hp_search_backend  # what hyperparameter_search() sets
    with pytest.raises(KeyboardInterrupt) as stopped:
        trainer.train()
    # The progress bar is closed as the run stops (left open, it printed itself again at exit, after the message).
    [progress] = [c for c in trainer.callback_handler.callbacks if isinstance(c, ProgressCallback)]
    assert progress.training_bar is None
    notes = "\n".join(getattr(stopped.value, "__notes__", []))
    return notes, sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*"))


def test_ctrl_c_saves_the_progress_but_not_in_the_middle_of_an_optimizer_step(tiny_backbones, tmp_path):
    notes, checkpoints = interrupted_run(tmp_path, tiny_backbones, "step_end", 2)
    assert "checkpoint-2" in notes and checkpoints == ["checkpoint-2"]

    # Stopped after the optimizer changed the weights of step 5 but before the step was counted: a checkpoint-4
    # would hold step 5's weights; none is written, and the note says why.
    notes, checkpoints = interrupted_run(tmp_path, tiny_backbones, "optimizer_step", 5)
    assert "during optimizer step 5" in notes and checkpoints == ["checkpoint-3"]

    # A hyperparameter search stops (prunes) trials on purpose: no rescue there.
    notes, checkpoints = interrupted_run(tmp_path, tiny_backbones, "step_end", 2, hp_search_backend="optuna")
    assert notes == "" and checkpoints == []


def test_a_multi_process_run_that_stops_says_its_last_steps_were_not_saved(
    tiny_backbones, tmp_path, monkeypatch
):
    """The other processes cannot join a save after one failed (a collective save would hang): no rescue there,
    and the error says so. The Trainer is told it is one of two processes only after its run."""
    from transformers import TrainingArguments

    _, trainer_for = rescue_setup(tmp_path, tiny_backbones)
    trainer = trainer_for(max_steps=4)
    trainer.train()
    shutil.rmtree(tmp_path / "run" / "checkpoint-4")  # as if step 4 were done but not saved
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    error = RuntimeError("NCCL timeout")
    trainer._save_progress_after(error)
    assert "in a run of 2 processes the others cannot join a save" in error.__notes__[0]
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-3"]


def test_the_cli_prints_where_a_failed_run_saved_its_progress(tmp_path, monkeypatch, capsys):
    from mmadapters import recipes

    def stopped(*args, **kwargs):
        error = ValueError("The image 3 cannot be read.")
        error.add_note(
            "mmadapters: training stopped after step 4; its progress is saved in run/checkpoint-4."
        )
        raise error

    monkeypatch.setattr(recipes, "train_from_recipe", stopped)
    assert main(["train", str(tmp_path / "recipe.yaml")]) == 2
    err = capsys.readouterr().err
    assert "error: The image 3 cannot be read." in err and "saved in run/checkpoint-4" in err


def test_the_cli_says_where_an_interrupted_run_saved_its_progress_without_a_traceback(
    tmp_path, monkeypatch, capsys
):
    """...and the command that continues it is this command line with --resume, runnable as it is."""
    import shlex
    import sys

    from mmadapters import quickstart

    commands = []
    note = "mmadapters: training stopped after step 4; its progress is saved in q/checkpoint-4."

    def interrupted(*args, resume_command, **kwargs):
        commands.append(resume_command)
        interrupt = KeyboardInterrupt()
        interrupt.add_note(note)
        raise interrupt

    monkeypatch.setattr(quickstart, "run_quickstart", interrupted)
    folder = str(tmp_path / "my output")
    assert main(["quickstart", "--output-dir", folder, "--seed", "3"]) == 130
    assert capsys.readouterr().err.splitlines() == ["", "interrupted", note]
    monkeypatch.setattr(sys, "argv", ["/venv/bin/mmadapters"])  # the console script
    assert main(["quickstart", "--resume", "--output-dir", folder]) == 130
    assert [shlex.split(command) for command in commands] == [
        [
            sys.executable,
            "-m",
            "mmadapters.cli",
            "quickstart",
            "--output-dir",
            folder,
            "--seed",
            "3",
            "--resume",
        ],
        ["/venv/bin/mmadapters", "quickstart", "--output-dir", folder, "--resume"],
    ]


def fake_training_checkpoint(folder, step, settings):
    """A complete `checkpoint-<step>` (what checkpoint_is_complete reads) and the quickstart's settings record."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    save_file({"w": torch.zeros(1)}, checkpoint / "mmadapters_model.safetensors")
    (folder / "quickstart_settings.json").write_text(json.dumps(asdict(settings)))
    return checkpoint


def test_quickstart_resume_checks_before_anything_loads(tmp_path):
    from mmadapters.quickstart import QuickstartSettings, checkpoint_to_resume, run_quickstart

    settings = QuickstartSettings(train_steps=16, bf16=False)
    with pytest.raises(ValueError, match="Nothing to resume in .*without --resume to start over"):
        run_quickstart(tmp_path / "none", settings, log=lambda *_: None, resume=True)
    assert not (tmp_path / "none").exists()

    checkpoint = fake_training_checkpoint(tmp_path / "trainer", 3, settings)
    assert checkpoint_to_resume(tmp_path, settings) == str(checkpoint)
    with pytest.raises(ValueError, match=r"other settings: train_steps 16 \(now 20\), seed 0 \(now 1\)"):
        run_quickstart(tmp_path, QuickstartSettings(train_steps=20, seed=1, bf16=False), resume=True)
    (tmp_path / "trainer" / "quickstart_settings.json").unlink()  # not a quickstart run's folder
    with pytest.raises(ValueError, match="Nothing to resume"):
        checkpoint_to_resume(tmp_path, settings)


def test_a_new_quickstart_run_keeps_an_interrupted_runs_checkpoints(tmp_path):
    from mmadapters.quickstart import QuickstartSettings, keep_interrupted_run

    assert keep_interrupted_run(tmp_path, log=lambda *_: None) is None
    (tmp_path / "trainer").mkdir()  # a run stopped before its first save: its settings record goes
    (tmp_path / "trainer" / "quickstart_settings.json").write_text("{}")
    assert keep_interrupted_run(tmp_path, log=lambda *_: None) is None and not (tmp_path / "trainer").exists()
    kept = []
    for step in (3, 5):
        fake_training_checkpoint(tmp_path / "trainer", step, QuickstartSettings())
        kept.append(keep_interrupted_run(tmp_path, log=lambda *_: None))
    assert not (tmp_path / "trainer").exists() and kept[0] != kept[1]
    assert [sorted(p.name for p in folder.glob("checkpoint-*")) for folder in kept] == [
        ["checkpoint-3"],
        ["checkpoint-5"],
    ]


@pytest.mark.integration
def test_an_interrupted_quickstart_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch):
    """Ctrl-C at step 3 of 16 (checkpoints every 2 steps): the quickstart saves step 3 and says to continue with
    `mmadapters quickstart --resume`; resumed, it ends with the uninterrupted run's adapters, and a finished run
    leaves no training checkpoints behind (its result is checkpoint/)."""
    from mmadapters import trainers
    from mmadapters.quickstart import QuickstartSettings, run_quickstart

    settings = QuickstartSettings(
        train_steps=16,
        batch_size=2,
        num_test=4,
        eval_batch_size=4,
        text_max_new_tokens=2,
        feature_whitening=False,
        bf16=False,
    )
    quiet = dict(log=lambda *_: None)
    run_quickstart(tmp_path / "uninterrupted", settings, **quiet)
    uninterrupted = load_file(tmp_path / "uninterrupted" / "checkpoint" / "mmadapters_model.safetensors")
    assert not (tmp_path / "uninterrupted" / "trainer").exists()

    class InterruptedTrainer(trainers.LavinTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, callbacks=[InterruptAt("step_end", 3)], **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(trainers, "LavinTrainer", InterruptedTrainer)
        with pytest.raises(KeyboardInterrupt) as stopped:
            run_quickstart(tmp_path / "run", settings, **quiet)
    notes = "\n".join(stopped.value.__notes__)
    assert "stopped after step 3" in notes and "mmadapters quickstart --resume (with the same flags)" in notes
    assert sorted(p.name for p in (tmp_path / "run" / "trainer").glob("checkpoint-*")) == ["checkpoint-3"]
    assert not (tmp_path / "run" / "checkpoint").exists()

    summary = run_quickstart(tmp_path / "run", settings, **quiet, resume=True)
    assert summary["resumed_from"] == str(tmp_path / "run" / "trainer" / "checkpoint-3")
    assert_same(load_file(tmp_path / "run" / "checkpoint" / "mmadapters_model.safetensors"), uninterrupted)
    assert not (tmp_path / "run" / "trainer").exists()
