"""The CLI (train from a recipe, eval, chat, errors) and the quickstart at reduced size."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_recipe

from mmadapters import LavinForConditionalGeneration
from mmadapters.cli import main
from mmadapters.processing.base import takes_sanitized_text
from mmadapters.recipes import RecipeError, load_recipe


def test_train_eval_and_chat_commands(tiny_backbones, tmp_path, capsys, monkeypatch):
    path = write_recipe(tmp_path, tiny_backbones)
    assert main(["train", str(path)]) == 0
    final = tmp_path / "run" / "final"
    assert (final / "mmadapters_model.safetensors").is_file()
    LavinForConditionalGeneration.from_pretrained(final)
    capsys.readouterr()
    assert main(["eval", str(final), "--limit", "6"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["count"] == 6 and set(result["by_group"]) <= {"yes/no", "color", "shape"}
    written = json.loads((final / "eval_easy-vqa.json").read_text())  # every generation, beside the summary
    assert written["accuracy"] == result["accuracy"] and len(written["generations"]) == 6
    assert main(["eval", str(final), "--limit", "6", "--prompt-format", "describe"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["count"] == 6  # the open questions, scored on the word after a description
    # An untrained model rarely writes a description ("." then a word): fewer of its answers parse that way.
    assert described["unparsed"] >= result["unparsed"]

    import io

    from PIL import Image

    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(image)
    monkeypatch.setattr(
        sys,
        "stdin",
        io.StringIO(
            f"/image {image}\nwhat color?\nand now?\n/image {tmp_path}/missing.png\n/imgae {image}\n/image\n"
            f"{image} is a path, not a command\n/quit\n"
        ),
    )
    assert main(["chat", str(final), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any("attached" in line for line in out)
    # a bad image is a message, not a crash; a mistyped command is said, not sent as a question; /image without a
    # path likewise; a line that starts with a path is a question (answered after the last error)
    errors = [line for line in out if line.startswith("error:")]
    assert len(errors) == 3 and "does not exist" in errors[0]
    assert errors[1:] == [
        "error: unknown command /imgae: /image PATH, /reset or /quit",
        "error: /image needs a file path or URL: /image PATH",
    ]
    assert out.index(errors[-1]) < len(out) - 1


def test_recipe_with_feature_whitening_fits_it_on_the_training_images(tiny_backbones, tmp_path, capsys):
    # 40 easy-vqa questions name fewer distinct images; the tiny tower is 32 wide, so 33 images are needed.
    path = write_recipe(
        tmp_path, tiny_backbones, data={"name": "easy_vqa", "limit": 200}, feature_whitening=40
    )
    assert main(["train", str(path)]) == 0
    model = LavinForConditionalGeneration.from_pretrained(tmp_path / "run" / "final")
    assert model.config.vision_feature_whitening and int(model.feature_whitening.fitted) == 1
    too_few = write_recipe(tmp_path, tiny_backbones, feature_whitening=8)
    capsys.readouterr()
    assert main(["train", str(too_few)]) == 2
    assert "got 8 distinct training images" in capsys.readouterr().err


def test_first_distinct_images_skips_text_rows_and_repeated_paths():
    from PIL import Image

    from mmadapters.recipes import first_distinct_images

    decoded = [Image.new("RGB", (4, 4)) for _ in range(2)]  # equal pixels, two rows: both kept
    rows = [{"image": p} for p in ("a.png", None, "a.png", "b.png", decoded[0], decoded[1], "c.png")]
    assert first_distinct_images(rows, 10) == ["a.png", "b.png", decoded[0], decoded[1], "c.png"]
    assert first_distinct_images(rows, 2) == ["a.png", "b.png"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model": "gpt"}, "`model` must be one of ['crome', 'lavin']"),
        ({"data": {"name": "imagenet"}}, "data.name"),
        ({"optimizer": "adam"}, "unknown key"),
        ({"training": {"max_stepz": 1}}, "unknown field(s) ['max_stepz']"),
        ({"feature_whitening": True}, "`feature_whitening` is LaVIN's"),
        ({"model": "crome", "feature_whitening": 100}, "`feature_whitening` is LaVIN's"),
    ],
)
def test_bad_recipes_are_clear_errors(tiny_backbones, tmp_path, overrides, message, capsys):
    path = write_recipe(tmp_path, tiny_backbones, **overrides)
    assert main(["train", str(path)]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_shipped_recipes_are_valid():
    folder = os.path.join(os.path.dirname(__file__), "..", "recipes")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".yaml"))
    assert {
        "quickstart.yaml",
        "lavin-7b-scienceqa.yaml",
        "crome-pretrain.yaml",
        "crome-instruct.yaml",
        "crome-finetune.yaml",
    } <= set(names)
    for name in names:
        load_recipe(os.path.join(folder, name))
    published = load_recipe(os.path.join(folder, "lavin-7b-scienceqa.yaml"))["training"]
    assert published["learning_rate"] == pytest.approx(9e-3 * 32 / 256) and published["weight_decay"] == 0.02
    from mmadapters.quickstart import QuickstartSettings

    quickstart = load_recipe(os.path.join(folder, "quickstart.yaml"))  # the recipe is the quickstart's run
    defaults, training = QuickstartSettings(), quickstart["training"]
    assert (training["max_steps"], training["per_device_train_batch_size"], training["learning_rate"]) == (
        defaults.train_steps,
        defaults.batch_size,
        defaults.learning_rate,
    )
    assert quickstart["adapter"]["dropout"] == defaults.adapter_dropout
    assert quickstart["adapter"]["llm_routing"] == defaults.llm_routing
    assert training["bf16"] == "auto"  # the quickstart's default: see the test below


@pytest.mark.parametrize("native", [False, True])
def test_the_quickstart_trains_in_bfloat16_by_default_only_where_the_cpu_computes_it_natively(
    monkeypatch, native
):
    """Emulated bfloat16 made a quickstart step 16 times slower than float32 on an AVX2-only CPU (the default was
    always on): the settings' default and the flag's follow the CPU, and --bf16 / --no-bf16 force it."""
    import argparse

    from mmadapters.cli_arguments import add_dataclass_arguments
    from mmadapters.precision import native_bfloat16
    from mmadapters.quickstart import QuickstartSettings

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    assert native_bfloat16() is native and QuickstartSettings().bf16 is native
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, QuickstartSettings)
    assert parser.parse_args([]).bf16 is native
    assert parser.parse_args(["--bf16"]).bf16 is True and parser.parse_args(["--no-bf16"]).bf16 is False


@pytest.mark.integration
def test_quickstart_at_reduced_size(tmp_path):
    from mmadapters.quickstart import QuickstartSettings, run_quickstart
    from mmadapters.quickstart_prompts import HELD_OUT_QUESTIONS

    settings = QuickstartSettings(  # the paper's plain setting (the default is tested below)
        train_steps=2,
        batch_size=4,
        num_test=8,
        eval_batch_size=8,
        text_max_new_tokens=4,
        prompt_format="open",
        feature_whitening=False,
        vision_adapters=True,
    )
    # An earlier run's checkpoint and summary in the same folder are kept, not overwritten (they were before).
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "mmadapters_model.safetensors").write_bytes(b"earlier weights")
    (tmp_path / "quickstart_summary.json").write_text('{"earlier": true}')
    summary = run_quickstart(tmp_path, settings, log=lambda *_: None)
    [kept] = tmp_path.glob("checkpoint.*")
    assert (kept / "mmadapters_model.safetensors").read_bytes() == b"earlier weights"
    assert json.loads(
        (tmp_path / f"quickstart_summary.{kept.name.removeprefix('checkpoint.')}.json").read_text()
    )
    saved = json.loads((tmp_path / "quickstart_summary.json").read_text())
    for key in (
        "accuracy_before",
        "accuracy_after",
        "num_test_questions",
        "text_only_preserved",
        "text_only_identical",
        "trainable_parameters",
        "adapter_bytes",
        "wall_seconds",
        "checkpoint_dir",
    ):
        assert key in saved, key
    assert saved["num_test_questions"] == 8 and 0 <= saved["accuracy_after"] <= 1
    assert saved["trainable_parameters"] == summary["trainable_parameters"] > 0
    assert (
        os.path.getsize(os.path.join(saved["checkpoint_dir"], "mmadapters_model.safetensors"))
        == saved["adapter_bytes"]
    )
    LavinForConditionalGeneration.from_pretrained(saved["checkpoint_dir"])
    assert len(saved["text_only_answers"]) == saved["num_text_prompts_checked"] == len(HELD_OUT_QUESTIONS)
    assert set(saved["stage_seconds"]) == {
        "backbones",
        "llm_text_answers",
        "evaluation_before",
        "training",
        "evaluation_after",
        "saving",
    }
    assert os.path.isfile(os.path.join(saved["checkpoint_dir"], "eval_results.json"))  # for the model card


def test_a_rerun_keeps_each_earlier_quickstart_checkpoint(tmp_path):
    from mmadapters.quickstart import keep_earlier_run

    assert keep_earlier_run(tmp_path, log=lambda *_: None) is None  # nothing to keep
    kept = []
    for run in range(3):  # saved within one second: the names still differ
        (tmp_path / "checkpoint").mkdir()
        (tmp_path / "checkpoint" / "weights").write_text(str(run))
        (tmp_path / "quickstart_summary.json").write_text(str(run))
        kept.append(keep_earlier_run(tmp_path, log=lambda *_: None))
    assert not (tmp_path / "checkpoint").exists() and not (tmp_path / "quickstart_summary.json").exists()
    assert [(folder / "weights").read_text() for folder in kept] == ["0", "1", "2"]
    for run, folder in enumerate(kept):
        label = folder.name.removeprefix("checkpoint.")
        assert (tmp_path / f"quickstart_summary.{label}.json").read_text() == str(run)


def test_quickstart_defaults_and_bad_settings_stop_before_anything_loads(tmp_path):
    # The CLI's defaults are these settings' defaults, field by field: see
    # test_every_command_line_argument_has_help_and_quickstart_flags_come_from_its_settings.
    from mmadapters.quickstart import QuickstartSettings, run_quickstart

    defaults = QuickstartSettings()
    assert (defaults.prompt_format, defaults.feature_whitening, defaults.vision_adapters) == (
        "describe",
        True,
        False,
    )
    with pytest.raises(ValueError, match="prompt_format must be 'open' or 'describe'"):
        run_quickstart(tmp_path, QuickstartSettings(prompt_format="multiple_choice"), log=lambda *_: None)
    assert not any(tmp_path.iterdir())


@pytest.mark.integration
def test_quickstart_command_on_its_defaults_is_quiet_and_saves_what_it_describes(tmp_path):
    """`mmadapters quickstart` on its default method (describe prompts, feature whitening, no vision adapters) at
    reduced size, run as the README runs it. Its console: the steps, progress bars and results; no deprecation
    or library warnings. Its checkpoint: the model it describes, and a processor that chats in the layout it
    trained on."""
    from transformers import AutoProcessor

    from mmadapters.data.easy_vqa import format_prompt

    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmadapters.cli",
            "quickstart",
            "--output-dir",
            str(tmp_path),
            "--train-steps",
            "2",
            "--batch-size",
            "4",
            "--num-test",
            "8",
            "--eval-batch-size",
            "8",
            "--text-max-new-tokens",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    output = completed.stdout + completed.stderr
    assert all(f"[{step}/6]" in completed.stdout for step in range(1, 7))
    for marker in ("Warning", "deprecated", "kernels-community", "Loading weights"):
        assert marker not in output, [line for line in output.splitlines() if marker in line][:3]
    # The evaluations show a bar with ETA (tqdm on stderr), the results one rounded line each.
    assert "evaluating" in completed.stderr and "8/8" in completed.stderr
    accuracy_lines = [line for line in completed.stdout.splitlines() if line.strip().startswith("accuracy")]
    assert len(accuracy_lines) == 2
    assert all(
        re.fullmatch(r"accuracy \d\.\d{3} \((\S+ \d\.\d{3}(, )?)+\)", line.strip()) for line in accuracy_lines
    )

    summary = json.loads((tmp_path / "quickstart_summary.json").read_text())
    assert summary["settings"]["prompt_format"] == "describe" and summary["num_test_questions"] == 8
    model = LavinForConditionalGeneration.from_pretrained(summary["checkpoint_dir"])
    assert model.vision_adapters is None
    assert model.config.mm_adapter_config.dropout == 0.0
    assert summary["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    whitening = model.feature_whitening
    assert int(whitening.fitted) == 1 and not torch.equal(whitening.transform[0], torch.eye(192))
    results = json.loads(open(os.path.join(summary["checkpoint_dir"], "eval_results.json")).read())
    assert "describe" in json.dumps(results)
    # The saved processor prompts chat the way the quickstart trained: easy-vqa's plain layout, turn by turn.
    processor = AutoProcessor.from_pretrained(summary["checkpoint_dir"])
    image_turn = {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "What shape is this?"}],
    }
    assert processor.apply_chat_template([image_turn], add_generation_prompt=True) == format_prompt(
        "What shape is this?", "describe", [], image=True
    )
    conversation = [
        image_turn,
        {"role": "assistant", "content": [{"type": "text", "text": "blue circle. circle"}]},
        {"role": "user", "content": [{"type": "text", "text": "Is it blue?"}]},
    ]
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == (
        "Image: <image>\nQuestion: What shape is this?\nAnswer: blue circle. circle\nQuestion: Is it blue?\nAnswer:"
    )
    assert (
        processor.apply_chat_template([{"role": "user", "content": "Hi"}])
        == "Image: N/A\nQuestion: Hi\nAnswer:"
    )


def test_version_names_the_package_and_the_libraries_it_runs_on(capsys):
    """`mmadapters --version` prints what a bug report needs and exits 0."""
    from importlib.metadata import version

    import mmadapters

    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"mmadapters {mmadapters.__version__} (Python {sys.version.split()[0]}, ")
    for name in ("torch", "transformers", "peft", "accelerate", "huggingface_hub"):
        assert f"{name} {version(name)}" in line


def test_first_sentence_is_the_answer():
    from mmadapters.quickstart import first_sentence

    assert (
        first_sentence(" The capital of France is Paris. It is a large") == "The capital of France is Paris."
    )
    assert first_sentence("Paris\nThe city") == "Paris"
    assert first_sentence("2 +  3 = 5") == "2 + 3 = 5"
    assert first_sentence("") == ""


def test_method_registry_builds_both_models_and_their_processors(tiny_backbones, tmp_path):
    from mmadapters.methods import METHODS, method

    assert sorted(METHODS) == ["crome", "lavin"]
    for kind in METHODS:
        model, processor = method(kind).build(*tiny_backbones)
        assert isinstance(model, method(kind).model_class) and isinstance(
            processor, method(kind).processor_class
        )
        assert processor.num_image_tokens == model.config.num_image_tokens
    # The recipe's Trainer: CROME's takes the stage.
    from transformers import TrainingArguments

    from mmadapters.trainers import CromeTrainer, LavinTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    crome, _ = method("crome").build(*tiny_backbones)
    trainer = method("crome").trainer({"stage": "pretrain"}, model=crome, args=args)
    assert isinstance(trainer, CromeTrainer) and trainer.stage == "pretrain"
    lavin, _ = method("lavin").build(*tiny_backbones)
    assert isinstance(method("lavin").trainer({}, model=lavin, args=args), LavinTrainer)
    with pytest.raises(ValueError, match="the methods are \\['crome', 'lavin'\\]"):
        method("blip")


def test_every_command_line_argument_has_help_and_quickstart_flags_come_from_its_settings():
    import argparse
    import dataclasses

    from mmadapters.cli import build_parser
    from mmadapters.quickstart import QuickstartSettings

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [
        f"{name} {action.option_strings or action.dest}"
        for name, command in commands.items()
        for action in command._actions
        if not action.help and not isinstance(action, argparse._HelpAction)
    ]
    assert missing == []
    defaults = vars(commands["quickstart"].parse_args([]))
    for name, default in dataclasses.asdict(QuickstartSettings()).items():  # bf16's depends on the CPU
        assert defaults[name] == default, name
    args = commands["quickstart"].parse_args(["--train-steps", "7", "--no-feature-whitening", "--seed", "3"])
    assert (args.train_steps, args.feature_whitening, args.seed) == (7, False, 3)


def test_mmadapters_demo_takes_and_lists_the_apps_own_options(capsys):
    from mmadapters.cli import build_parser, main
    from mmadapters.demo import build_parser as build_demo_parser

    app_options = {option for action in build_demo_parser()._actions for option in action.option_strings}
    with pytest.raises(SystemExit) as stopped:
        main(["demo", "-h"])
    assert stopped.value.code == 0
    listed = capsys.readouterr().out
    assert [option for option in sorted(app_options) if option not in listed] == []
    args = build_parser().parse_args(
        ["demo", "ck", "--port", "7000", "--max-new-tokens", "5", "--kind", "crome"]
    )
    assert (args.model, args.port, args.max_new_tokens, args.kind) == ("ck", 7000, 5, "crome")
    with pytest.raises(SystemExit):
        main(["demo", "--port", "99999"])
    assert "mmadapters demo: error: argument --port" in capsys.readouterr().err


def test_quickstart_text_prompts_held_out_are_not_trained_on():
    from mmadapters.quickstart_prompts import HELD_OUT_QUESTIONS, TEMPLATES, training_questions

    training = training_questions()
    assert (
        len(set(training)) == len(training) and len(set(HELD_OUT_QUESTIONS)) == len(HELD_OUT_QUESTIONS) == 40
    )
    assert not set(training) & set(HELD_OUT_QUESTIONS)
    assert len(training) == 20 + sum(len(fillers) for _, fillers in TEMPLATES)


def test_eval_limit_all_means_the_whole_split():
    from mmadapters.cli import NO_LIMIT_GIVEN, build_parser
    from mmadapters.data import load_easy_vqa

    parser = build_parser()
    assert parser.parse_args(["eval", "ckpt", "--limit", "all"]).limit is None
    assert parser.parse_args(["eval", "ckpt"]).limit == NO_LIMIT_GIVEN
    assert parser.parse_args(["eval", "ckpt", "--limit", "7"]).limit == 7
    assert len(load_easy_vqa("test", limit=None, prompt_format="open")) == 9673  # what --limit all evaluates


def test_every_mmadapters_error_is_one_cli_line(tmp_path, capsys):
    """All our error classes share MMAdaptersError (what `main` catches); a checkpoint whose backbone folder is
    gone (BackboneNotFoundError, an OSError) is one `error:` line, exit 2, not a traceback."""
    import importlib
    import pkgutil
    import shutil

    import mmadapters
    from mmadapters.errors import MMAdaptersError
    from mmadapters.modeling.lavin import LavinForConditionalGeneration as Lavin

    ours = set()
    for module_info in pkgutil.walk_packages(mmadapters.__path__, "mmadapters."):
        try:
            module = importlib.import_module(module_info.name)
        except ModuleNotFoundError as error:
            # the optional lmms-eval plugin, where lmms-eval is not installed
            if (error.name or "").split(".")[0] == "lmms_eval":
                continue
            raise
        ours |= {
            value
            for value in vars(module).values()
            if isinstance(value, type)
            and issubclass(value, Exception)
            and value.__module__ == module.__name__
        }
    assert len(ours) >= 15
    assert [error.__name__ for error in ours if not issubclass(error, MMAdaptersError)] == []
    # ... and each has its row in the README's table of errors.
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("### Errors you can get", 1)[1].split("\n### ", 1)[0]
    assert (
        sorted(e.__name__ for e in ours if e is not MMAdaptersError and f"| `{e.__name__}`" not in table)
        == []
    )

    from conftest import save_tiny_llm, save_tiny_vision

    llm = save_tiny_llm(tmp_path / "llm")
    vision = save_tiny_vision(tmp_path / "vision")
    checkpoint = tmp_path / "checkpoint"
    Lavin.from_backbones(llm, vision).save_pretrained(checkpoint)
    from mmadapters import LavinProcessor

    LavinProcessor.from_backbones(llm, vision).save_pretrained(checkpoint)
    shutil.move(tmp_path / "llm", tmp_path / "moved_llm")
    capsys.readouterr()
    assert main(["eval", str(checkpoint), "--limit", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and "--text-model" in err

    # The way out the message names: the backbone's new place, checked against the checkpoint's record.
    output = tmp_path / "eval.json"
    command = ["eval", str(checkpoint), "--limit", "2", "--output", str(output)]
    assert main([*command, "--text-model", str(tmp_path / "moved_llm")]) == 0
    assert json.loads(output.read_text())["count"] == 2  # --output is honoured for easy-vqa too
    assert json.loads((checkpoint / "eval_results.json").read_text())  # and recorded for the model card
    other_llm = save_tiny_llm(tmp_path / "other_llm", seed=1)
    capsys.readouterr()
    assert main([*command, "--text-model", other_llm]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "has different weights" in err and "--text-model" in err
    assert "Traceback" not in err and "--ignore-backbone-mismatch" in err
    # The way to mean it: the adapters on another backbone (a fine-tuned variant), evaluated.
    output.unlink()
    assert main([*command, "--text-model", other_llm, "--ignore-backbone-mismatch"]) == 0
    assert json.loads(output.read_text())["count"] == 2


def test_chat_outgrowing_the_llm_context_says_so_and_goes_on(tiny_backbones, tmp_path, capsys, monkeypatch):
    """A conversation longer than the LLM's context (256 positions here) ended the chat with the model's error, the
    conversation lost; like the demo, the chat now refuses that question (its image too), caps each answer to the
    room left, and goes on: /reset starts again."""
    import io

    from PIL import Image

    from mmadapters import LavinProcessor

    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    model.save_pretrained(tmp_path / "ckpt", processor=LavinProcessor.from_backbones(*tiny_backbones))
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(image)
    question = "tell me more about the picture please and all the details of the colours and shapes"
    lines = [f"/image {image}", question] + [question] * 12 + [f"/image {image}", question, "/reset"]
    lines += [
        "what is <image> here?",
        "hi",
        "/quit",
    ]  # a placeholder typed by hand: said, and the chat goes on
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", str(tmp_path / "ckpt"), "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    refusals = [i for i, line in enumerate(out) if "fills the model's context" in line]
    assert refusals and "/reset" in out[refusals[0]]
    cleared = out.index("(conversation cleared)")
    assert cleared > refusals[-1]
    if (
        takes_sanitized_text()
    ):  # transformers >= 5.25: typed control tokens are text, and the question is answered
        assert not any(line.startswith("error:") for line in out[cleared:])
    else:
        assert out[cleared + 1].startswith(
            "error: Got 0 image(s) but the text holds 1 `<image>` placeholder(s)"
        )
        assert [line.startswith("error:") for line in out].count(True) == 1
    assert cleared + 2 < len(out)  # "hi" was answered after it
