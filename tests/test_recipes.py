"""Recipe keys for the backbones and the run: dtype, quantization (LaVIN-lite), lora, eval_data; their errors."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import write_recipe
from safetensors.torch import load_file

from mmadapters import LavinForConditionalGeneration
from mmadapters.cli import main
from mmadapters.recipes import build_model_and_processor, load_recipe


def test_dtype_sets_the_backbones_and_keeps_the_adapters_in_float32(tiny_backbones, tmp_path):
    model, _ = build_model_and_processor(
        load_recipe(write_recipe(tmp_path, tiny_backbones, dtype="bfloat16"))
    )
    assert model.language_model.dtype == torch.bfloat16 and model.vision_tower.dtype == torch.bfloat16
    assert model.projector.linear_1.weight.dtype == torch.float32


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_quantization_builds_lavin_lite(tiny_backbones, tmp_path):
    quantization = {
        "text_config": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    }
    path = write_recipe(tmp_path, tiny_backbones, quantization=quantization)
    model, _ = build_model_and_processor(load_recipe(path))
    assert type(model.language_model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert model.config.backbone_quantization["text_config"]["bnb_4bit_quant_type"] == "nf4"
    assert main(["train", str(path)]) == 0  # and it trains


def test_lora_block_trains_lora_on_top_and_saves_it(tiny_backbones, tmp_path):
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "on": "language_model"}
    path = write_recipe(tmp_path, tiny_backbones, lora=lora)
    assert main(["train", str(path)]) == 0
    saved = load_file(tmp_path / "run" / "final" / "mmadapters_model.safetensors")
    lora_b = [k for k in saved if k.startswith("language_model.") and ".lora_B." in k]
    assert lora_b and any(torch.count_nonzero(saved[k]) for k in lora_b)  # LoRA B starts at zero: it trained
    assert not any(k.startswith("vision_tower.") for k in saved)
    model = LavinForConditionalGeneration.from_pretrained(tmp_path / "run" / "final")
    assert model.config.peft_adapters["default"]["config"]["r"] == 4


def test_eval_data_gives_an_evaluation_loss(tiny_backbones, tmp_path):
    training = {
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "use_cpu": True,
        "eval_steps": 1,
        "save_steps": 2,
        "per_device_eval_batch_size": 4,
    }
    path = write_recipe(
        tmp_path,
        tiny_backbones,
        eval_data={"name": "easy_vqa", "split": "test", "limit": 8},
        training=training,
    )
    assert main(["train", str(path)]) == 0
    state = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    losses = [entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_auto_trains_in_bfloat16_only_where_the_device_computes_it_natively(
    tiny_backbones, tmp_path, monkeypatch, native
):
    """`training.bf16: auto` (the quickstart recipe's): emulated bfloat16 made a quickstart step 16 times slower
    than float32 on an AVX2-only CPU."""
    import mmadapters.recipes

    asked = []
    monkeypatch.setattr(mmadapters.recipes, "native_bfloat16", lambda device: asked.append(device) or native)
    training = {
        "max_steps": 1,
        "per_device_train_batch_size": 4,
        "use_cpu": True,
        "bf16": "auto",
        "save_steps": 1,
    }
    assert main(["train", str(write_recipe(tmp_path, tiny_backbones, training=training))]) == 0
    args = torch.load(tmp_path / "run" / "checkpoint-1" / "training_args.bin", weights_only=False)
    assert asked == ["cpu"] and args.bf16 is native


def test_bf16_takes_true_false_or_auto(tiny_backbones, tmp_path, capsys):
    training = {"max_steps": 1, "bf16": "sometimes"}
    assert main(["train", str(write_recipe(tmp_path, tiny_backbones, training=training))]) == 2
    assert "`training.bf16`" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"dtype": "fp8"}, "`dtype` must be one of"),
        ({"quantization": {"text": {"load_in_4bit": True}}}, "`quantization` must map `text_config`"),
        (
            {"quantization": {"text_config": {"load_in_3bit": True}}},
            "unknown BitsAndBytesConfig field(s) ['load_in_3bit']",
        ),
        ({"lora": {"rank": 8}}, "`lora`:"),
        ({"lora": {"r": 8, "on": "decoder"}}, "`lora.on` must be"),
        ({"eval_data": {"name": "mnist"}}, "`eval_data.name` must be one of"),
        ({"eval_data": {"name": "easy_vqa", "limit": 0}}, "`eval_data.limit` must be a positive integer"),
        ({"hub_license": 2.0}, "`hub_license` must be a Hub license identifier"),
        # a misspelt key or TrainingArguments field: the closest known name is suggested
        (
            {"trainig": {"max_steps": 1}},
            "unknown key(s) ['trainig'] (did you mean 'training' for 'trainig'?)",
        ),
        (
            {"training": {"max_steps": 1, "learning_rat": 1.0e-3, "num_train_epoch": 2}},
            "(did you mean 'learning_rate' for 'learning_rat', 'num_train_epochs' for 'num_train_epoch'?)",
        ),
        (
            {"training": {"max_steps": 2, "push_to_hub": True, "hub_model_id": "me/run"}},
            "text backbone is a path on this machine",
        ),
    ],
)
def test_bad_new_keys_are_clear_errors(tiny_backbones, tmp_path, overrides, message, capsys):
    assert main(["train", str(write_recipe(tmp_path, tiny_backbones, **overrides))]) == 2
    assert message in capsys.readouterr().err


def test_scienceqa_trains_from_a_local_copy_in_the_official_layout_and_limits_are_honoured(
    tiny_backbones, tmp_path
):
    """`data: {name: scienceqa, path: ...}` reads LaVIN's data/ folder (problems.json, pid_splits.json, images/);
    `limit` takes the first rows of every data set (it was dropped for scienceqa and llava)."""
    from PIL import Image

    from mmadapters.recipes import build_dataset

    folder = tmp_path / "data"
    problems = {}
    for number in range(6):
        pid = str(number)
        with_image = number % 2 == 0
        problems[pid] = {"question": f"q{number}?", "choices": ["red", "blue"], "answer": number % 2, "hint": "",
                         "lecture": "", "solution": "", "subject": "natural science", "grade": "grade1",
                         "image": "image.png" if with_image else None, "split": "train"}  # fmt: skip
        if with_image:
            (folder / "images" / "train" / pid).mkdir(parents=True)
            Image.new("RGB", (32, 32), (255, 0, 0)).save(folder / "images" / "train" / pid / "image.png")
    (folder / "pid_splits.json").write_text(json.dumps({"train": sorted(problems), "test": []}))
    (folder / "problems.json").write_text(json.dumps(problems))

    rows = build_dataset({"name": "scienceqa", "path": str(folder), "limit": 4}, processor=None)
    assert (
        len(rows) == 4 and rows["image"][1] is None and rows["image"][0].endswith("images/train/0/image.png")
    )
    assert rows["prompt"][0].startswith(
        "Image: <image> Question: q0?\nContext: N/A\nOptions: (A) red (B) blue"
    )
    assert rows["target"][1] == "The answer is B. BECAUSE:"

    conversations = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]}
                     for i in range(5)]  # fmt: skip
    (tmp_path / "chat.json").write_text(json.dumps(conversations))
    processor = build_model_and_processor(load_recipe(str(write_recipe(tmp_path, tiny_backbones))))[1]
    chats = build_dataset({"name": "llava", "json": str(tmp_path / "chat.json"), "limit": 2}, processor)
    assert len(chats) == 2

    recipe = write_recipe(
        tmp_path, tiny_backbones, data={"name": "scienceqa", "path": str(folder), "limit": 4}
    )
    assert main(["train", str(recipe)]) == 0
    assert (tmp_path / "run" / "final" / "mmadapters_model.safetensors").is_file()


def test_a_data_option_the_data_set_does_not_take_is_refused(tiny_backbones, tmp_path, capsys):
    recipe = write_recipe(tmp_path, tiny_backbones, data={"name": "scienceqa", "split": "train", "limt": 5})
    assert main(["train", str(recipe)]) == 2
    assert (
        "`data` has option(s) ['limt'] that scienceqa does not take; it takes ['split', 'path', 'limit']"
        in (capsys.readouterr().err)
    )


def test_from_checkpoint_takes_a_peft_adapter_folder_with_its_base_checkpoint(tiny_backbones, tmp_path):
    """`from_checkpoint` naming what `PeftModel.save_pretrained` wrote on top of a checkpoint: training continues
    from the checkpoint with the adapter on it (frozen, as transformers loads one), with the checkpoint's
    processor."""
    from peft import LoraConfig, get_peft_model

    from mmadapters import LavinProcessor

    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    model.save_pretrained(tmp_path / "ckpt", processor=LavinProcessor.from_backbones(*tiny_backbones))
    config = LoraConfig(r=2, target_modules=r".*language_model.*\.q_proj")
    get_peft_model(LavinForConditionalGeneration.from_pretrained(tmp_path / "ckpt"), config).save_pretrained(
        tmp_path / "lora"
    )
    recipe = load_recipe(str(write_recipe(tmp_path, tiny_backbones, from_checkpoint=str(tmp_path / "lora"))))
    model, processor = build_model_and_processor(recipe)
    assert isinstance(processor, LavinProcessor) and model.training
    assert list(model.config.peft_adapters) == ["default"]
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any("lora_" in name for name in trainable)


def test_from_checkpoint_honours_the_backbone_and_adapter_keys_or_refuses_them(
    tiny_backbones, tmp_path, capsys
):
    """A run that continues from a checkpoint: `text_model` / `vision_model` say where its backbones are (checked
    against its record), `adapter` changes the settings that leave the weights alone; keys that would build
    something else (adapter shapes, another method, whitening, init_from) are refused before anything trains."""
    import shutil

    first = tmp_path / "first"
    first.mkdir()
    assert main(["train", str(write_recipe(first, tiny_backbones))]) == 0
    stage_one = first / "run" / "final"
    config = json.loads((stage_one / "config.json").read_text())
    config["text_backbone"]["name_or_path"] = str(tmp_path / "gone")  # trained on another machine's folder
    (stage_one / "config.json").write_text(json.dumps(config))
    # Saved without its processor: it is rebuilt from the backbones where the recipe says they are (it was rebuilt
    # from the recorded folder, which is gone).
    for saved in stage_one.iterdir():
        if saved.name.startswith(
            ("tokenizer", "processor", "preprocessor", "chat_template", "special_tokens")
        ):
            saved.unlink()
    moved_llm = shutil.copytree(tiny_backbones[0], tmp_path / "llm-here")

    def recipe(**overrides):
        keys = {"from_checkpoint": str(stage_one), "text_model": str(moved_llm), **overrides}
        return str(write_recipe(tmp_path, tiny_backbones, **keys))

    assert main(["train", recipe(adapter={"temperature": 3.0, "dropout": 0.0})]) == 0
    continued = LavinForConditionalGeneration.from_pretrained(
        tmp_path / "run" / "final", text_model=moved_llm
    )
    assert continued.config.adapter_config["temperature"] == 3.0 and continued.config.adapter_config["r"] == 8
    capsys.readouterr()
    for overrides, message in (
        ({"adapter": {"r": 4}}, "r (8 -> 4)"),
        (
            {"model": "crome"},
            "is a lavin checkpoint, but the recipe says `model: crome`: set `model: lavin`",
        ),
        ({"feature_whitening": 40}, "`feature_whitening` builds new"),
        (
            {"model": "crome", "init_from": "Salesforce/instructblip-vicuna-7b"},
            "`init_from` and `from_checkpoint`",
        ),
    ):
        assert main(["train", recipe(**overrides)]) == 2, overrides
        assert message in capsys.readouterr().err, overrides
