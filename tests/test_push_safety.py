"""Push safety: nothing leaves the machine that should not (symlinks out of the folder, weights under other names,
Trainer state with a token), checked on the upload plan (no Hub needed) and on a real Trainer checkpoint."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from mmadapters import LavinForConditionalGeneration, LavinProcessor
from mmadapters.hub import push_folder
from mmadapters.hub.push import PushError, is_checkpoint_file

TOKEN = "hf_PLANTEDplantedPLANTEDtoken0123456789"


@pytest.fixture()
def checkpoint(tiny_backbones, tmp_path):
    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder, processor=LavinProcessor.from_backbones(*tiny_backbones))
    return folder


def plan(folder):
    return {
        f.path
        for f in push_folder(
            folder, "me/repo", dry_run=True, allow_local_backbones=True, license="apache-2.0"
        )
    }


def test_a_clean_checkpoint_plans_its_own_files(checkpoint):
    assert {"config.json", "mmadapters_model.safetensors", "README.md"} <= plan(checkpoint)


def test_a_processor_with_named_chat_templates_pushes_them_all(tiny_backbones, tmp_path):
    """A processor keeps an LLM's named chat templates (tool_use, ...); transformers saves the ones besides the
    default in `additional_chat_templates/`, which the push refused as "not part of a checkpoint" (and a Trainer's
    push left out)."""
    processor = LavinProcessor.from_backbones(*tiny_backbones)
    processor.chat_template = {"default": processor.chat_template, "tool_use": processor.chat_template}
    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    model.save_pretrained(tmp_path / "ckpt", processor=processor)
    saved = {
        os.path.relpath(os.path.join(root, name), tmp_path / "ckpt")
        for root, _, names in os.walk(tmp_path / "ckpt")
        for name in names
    }
    extra = {path for path in saved if path.startswith("additional_chat_templates/")}
    assert extra and extra <= plan(tmp_path / "ckpt")
    assert is_checkpoint_file("additional_chat_templates/tool_use.jinja")
    assert not is_checkpoint_file("logs/tool_use.jinja") and not is_checkpoint_file(
        "additional_chat_templates/x.bin"
    )


def test_a_checkpoint_with_lora_on_top_pushes_with_its_lora(tiny_backbones, tmp_path):
    """LoRA tensors sit under language_model.* in the adapter file: they are adapter tensors, not backbone ones;
    a PEFT adapter saved into the same folder is refused (transformers would load the repo as that adapter)."""
    from peft import LoraConfig, get_peft_model

    from mmadapters import add_lora

    model = add_lora(
        LavinForConditionalGeneration.from_backbones(*tiny_backbones),
        LoraConfig(r=2, target_modules=["q_proj"]),
    )
    model.save_pretrained(tmp_path / "lora")
    assert "mmadapters_model.safetensors" in plan(tmp_path / "lora")
    get_peft_model(
        LavinForConditionalGeneration.from_backbones(*tiny_backbones),
        LoraConfig(r=2, target_modules=["q_proj"]),
    ).save_pretrained(tmp_path / "lora")
    with pytest.raises(PushError, match="holds a PEFT adapter"):
        plan(tmp_path / "lora")


def test_symlink_leaving_the_folder_is_refused(checkpoint, tmp_path):
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    os.symlink(secret, checkpoint / "notes.md")
    with pytest.raises(PushError, match="symlink .* outside the folder"):
        plan(checkpoint)


@pytest.mark.parametrize("name", ["backbone.safetensors", "consolidated.00.pth", "model.pt", "notes.txt"])
def test_files_that_are_not_part_of_a_checkpoint_are_refused(checkpoint, name):
    (checkpoint / name).write_bytes(b"\x80\x04weights")
    with pytest.raises(PushError, match="not part of a checkpoint"):
        plan(checkpoint)


def test_weights_under_a_text_file_name_are_refused_by_content(checkpoint):
    save_file({"model.layers.0.weight": torch.zeros(4, 4)}, checkpoint / "special_tokens_map.json")
    with pytest.raises(PushError, match="hold\\(s\\) tensors"):
        plan(checkpoint)
    torch.save({"w": torch.zeros(2)}, checkpoint / "special_tokens_map.json")  # a torch.save zip archive
    with pytest.raises(PushError, match="hold\\(s\\) tensors"):
        plan(checkpoint)


def test_backbone_tensors_in_the_adapter_file_are_refused(checkpoint):
    save_file(
        {"language_model.model.embed_tokens.weight": torch.zeros(4, 4)},
        checkpoint / "mmadapters_model.safetensors",
    )
    with pytest.raises(PushError, match="backbone tensors"):
        plan(checkpoint)


def test_trainer_checkpoint_holds_no_token_and_its_state_is_never_pushed(tiny_backbones, tmp_path):
    from conftest import make_trainer, toy_dataset

    processor = LavinProcessor.from_backbones(*tiny_backbones)
    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    trainer = make_trainer(model, processor, toy_dataset(tmp_path), tmp_path / "run", max_steps=3)
    trainer.args.hub_token = TOKEN
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert (checkpoint / "training_args.bin").is_file() and (checkpoint / "optimizer.pt").is_file()
    for path in checkpoint.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert trainer.args.hub_token == TOKEN  # the live arguments are untouched
    planned = plan(checkpoint)
    assert not {"training_args.bin", "optimizer.pt", "scheduler.pt", "trainer_state.json"} & planned
    assert "mmadapters_model.safetensors" in planned


def test_trainer_push_to_hub_refuses_up_front_what_it_could_not_push(tiny_backbones, tmp_path):
    """TrainingArguments(push_to_hub=True) is refused when the Trainer is created (before the repo is created or a
    step is run), not at the first save: backbones that are paths on this machine, backbones built from configs
    (their checkpoints hold every weight). transformers' model-card keywords our card cannot honour are refused."""
    from conftest import make_trainer, tiny_text_config, tiny_vision_config, toy_dataset

    processor = LavinProcessor.from_backbones(*tiny_backbones)
    dataset = toy_dataset(tmp_path)
    push = dict(push_to_hub=True, hub_model_id="me/run")
    local = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    with pytest.raises(PushError, match=r"text backbone is a path on this machine .*--allow-local-backbones"):
        make_trainer(local, processor, dataset, tmp_path / "a", training=push)
    from_configs = LavinForConditionalGeneration.from_backbones(tiny_text_config(), tiny_vision_config())
    with pytest.raises(PushError, match="built from config objects"):
        make_trainer(from_configs, processor, dataset, tmp_path / "b", training=push)
    trainer = make_trainer(local, processor, dataset, tmp_path / "c")
    with pytest.raises(TypeError, match=r"\['finetuned_from'\].*takes `license` and `tags`"):
        trainer.push_to_hub(finetuned_from="org/base")
    assert not os.listdir(tmp_path / "c")  # refused before saving anything


def test_trainer_push_to_hub_takes_the_cards_license_when_the_repo_is_made_there(
    tiny_backbones, tmp_path, monkeypatch
):
    """Without push_to_hub in the arguments, `trainer.push_to_hub(license=...)` runs the up-front checks and
    creates the repo itself: the license it is given settles the card's (backbones whose cards name none)."""
    from conftest import make_trainer, toy_dataset

    from mmadapters.hub import trainer_push
    from mmadapters.trainers import trainer as trainer_module

    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    for role in ("text", "vision"):  # named as Hub repos whose cards name no license
        recorded = getattr(model.config, f"{role}_backbone")
        setattr(model.config, f"{role}_backbone", {**recorded, "name_or_path": f"org/tiny-{role}"})
    monkeypatch.setattr(trainer_push, "backbone_license", lambda name, endpoint=None, token=None: None)
    pushed = {}
    monkeypatch.setattr(trainer_module, "create_repo", lambda repo_id, *args, **kwargs: f"me/{repo_id}")
    monkeypatch.setattr(
        trainer_module,
        "push_trainer_folder",
        lambda folder, repo_id, license, **kwargs: pushed.update(repo_id=repo_id, license=license) or "url",
    )
    processor = LavinProcessor.from_backbones(*tiny_backbones)
    trainer = make_trainer(model, processor, toy_dataset(tmp_path), tmp_path / "run")
    with pytest.raises(PushError, match="hub_license="):
        trainer.push_to_hub()
    assert trainer.push_to_hub(license="mit") == "url"
    assert pushed == {"repo_id": "me/run", "license": "mit"}


def test_a_space_folder_with_disguised_weights_is_refused(tmp_path):
    from mmadapters.hub import push_space

    space = tmp_path / "space"
    shutil.copytree(os.path.join(os.path.dirname(__file__), "..", "spaces", "lavin"), space)
    torch.save({"w": torch.zeros(2)}, space / "examples" / "notes.txt")
    with pytest.raises(PushError, match="holds model weights"):
        push_space(space, "me/space", model="me/repo", dry_run=True)
