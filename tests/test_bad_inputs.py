"""Bad input gets a clear error and loses nothing: each case asserts the message and that no file changed."""

from __future__ import annotations

import os
import re
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mmadapters import (
    CromeForConditionalGeneration,
    CromeProcessor,
    LavinForConditionalGeneration,
    LavinProcessor,
)
from mmadapters.checkpoint_files import CheckpointKindError
from mmadapters.cli import main
from mmadapters.modeling.backbones import BackboneNotFoundError


@pytest.fixture(scope="module")
def saved(tiny_backbones, tmp_path_factory):
    """A LaVIN checkpoint folder, the model and a valid batch (one image sample, one text-only sample)."""
    folder = tmp_path_factory.mktemp("bad") / "ckpt"
    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones).eval()
    processor = LavinProcessor.from_backbones(*tiny_backbones)
    model.save_pretrained(folder, processor=processor)
    image = (torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    batch = processor(images=[[image], []], text=["Image: <image>\nwhat color?", "Image: N/A\nhello"])
    return folder, model, dict(batch)


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


FORWARD_CASES = {
    "float input_ids": (lambda b: {**b, "input_ids": b["input_ids"].float()}, "integer token ids"),
    "1-D input_ids": (
        lambda b: {"input_ids": b["input_ids"][1], "attention_mask": b["attention_mask"][1]},
        "must be 2-D",
    ),
    "attention mask of another batch": (
        lambda b: {**b, "attention_mask": b["attention_mask"][:1]},
        "same batch",
    ),
    "attention mask of another length": (
        lambda b: {**b, "attention_mask": b["attention_mask"][:, :3]},
        "same batch and sequence",
    ),
    "one-channel images": (
        lambda b: {**b, "pixel_values": b["pixel_values"][:, :1]},
        "\\(num_images, 3, height",
    ),
    "integer images": (lambda b: {**b, "pixel_values": b["pixel_values"].long()}, "floating point"),
    "3-D images": (lambda b: {**b, "pixel_values": b["pixel_values"][0]}, "\\(num_images, 3, height"),
    "image tokens without images": (
        lambda b: {k: v for k, v in b.items() if k != "pixel_values"},
        "no pixel_values",
    ),
    "more images than placeholders": (
        lambda b: {**b, "pixel_values": torch.cat([b["pixel_values"]] * 2)},
        "image placeholder tokens",
    ),
    "ids outside the vocabulary": (
        lambda b: {**b, "input_ids": torch.cat([b["input_ids"][:, :-1], torch.full((2, 1), 10_000)], dim=1)},
        "outside the LLM vocabulary",
    ),
    "longer than the context": (
        lambda b: {
            "input_ids": torch.full((1, 300), 40),
            "attention_mask": torch.ones(1, 300, dtype=torch.long),
        },
        "LLM's context holds 256",
    ),
    "input_ids and inputs_embeds": (lambda b: {**b, "inputs_embeds": torch.zeros(2, 1, 32)}, "exactly one"),
    "labels outside the vocabulary": (
        lambda b: {**b, "labels": torch.cat([b["input_ids"][:, :-1], torch.full((2, 1), 10_000)], dim=1)},
        "labels contain ids outside the LLM vocabulary",
    ),
    # Before: torch's "Expected input batch_size (36) to match target batch_size (32)" from inside the loss.
    "labels shorter than the sequence": (
        lambda b: {**b, "labels": b["input_ids"][:, :-2]},
        "labels has shape \\(2, 11\\) but must be \\(2, 13\\): the whole sequence",
    ),
    "labels of another batch": (
        lambda b: {**b, "labels": b["input_ids"][:1]},
        "labels has shape \\(1, 13\\) but must be \\(2, 13\\)",
    ),
    "float labels": (lambda b: {**b, "labels": b["input_ids"].float()}, "labels must hold integer token ids"),
    # Before: an IndexError from the mask functions of transformers.
    "1-D attention mask": (
        lambda b: {"input_ids": b["input_ids"][:1], "attention_mask": b["attention_mask"][0]},
        "attention_mask must be 2-D \\(batch, sequence\\)",
    ),
    # Before: a size mismatch inside the LLM's rotary embedding.
    "position ids of another length": (
        lambda b: {**b, "position_ids": torch.arange(3)[None]},
        "position_ids has shape \\(1, 3\\) but input_ids \\(2, 13\\)",
    ),
    # Before: "cannot reshape tensor of 0 elements" inside the LLM's attention.
    "empty input_ids": (lambda b: {"input_ids": torch.zeros(1, 0, dtype=torch.long)}, "input_ids is empty"),
    # LaVIN's routing inputs (before: size mismatches or IndexErrors inside the adapters).
    "modality of another batch": (
        lambda b: {**b, "modality": torch.tensor([1, 0, 1])},
        "modality has shape \\(3,\\) but must be \\(2,\\)",
    ),
    "float modality": (lambda b: {**b, "modality": torch.tensor([0.5, 0.2])}, "modality must hold integers"),
    "modality other than 0 or 1": (
        lambda b: {**b, "modality": torch.tensor([2, 0])},
        "0 \\(text only\\) or 1",
    ),
    "routing weights of another shape": (
        lambda b: {**b, "routing_weights": torch.rand(2, 1, 1, 2)},
        "routing_weights has shape \\(2, 1, 1, 2\\) but must be \\(2, 3, 1, 2\\)",
    ),
}

IMAGE_CASES = ("one-channel images", "integer images", "3-D images")  # also checked by get_image_features

GENERATE_CASES = (
    "modality of another batch",
    "float modality",
    "modality other than 0 or 1",
    "empty input_ids",
)


@pytest.mark.parametrize("case", sorted(FORWARD_CASES))
def test_forward_refuses_malformed_inputs(saved, case):
    _, model, batch = saved
    make, message = FORWARD_CASES[case]
    with pytest.raises(ValueError, match=message):
        model(**make(batch))
    if case in IMAGE_CASES:  # before: the vision tower's own errors ("not enough values to unpack", a conv's)
        with pytest.raises(ValueError, match=message):
            model.get_image_features(make(batch)["pixel_values"])
        with pytest.raises(ValueError, match=message):
            model.pooled_vision_features(make(batch)["pixel_values"])
    if case in GENERATE_CASES:  # generate reads modality itself before the first forward
        with pytest.raises(ValueError, match=message):
            model.generate(**make(batch), max_new_tokens=2)


def test_a_boolean_modality_routes_as_its_integers(saved, tiny_backbones, randomize_adapters):
    """modality=tensor([True, False]) indexes the routing table as [1, 0] (not as a mask, which picks rows)."""
    batch = saved[2]
    model = randomize_adapters(LavinForConditionalGeneration.from_backbones(*tiny_backbones).eval())
    as_text = model(**batch, modality=torch.tensor([0, 0])).logits
    as_bool = model(**batch, modality=torch.tensor([True, False])).logits
    as_long = model(**batch, modality=torch.tensor([1, 0])).logits
    torch.testing.assert_close(as_bool, as_long, rtol=0, atol=0)
    assert not torch.allclose(as_long[0], as_text[0])  # the routing matters for the image sample
    generated = model.generate(
        **batch, modality=torch.tensor([True, False]), max_new_tokens=3, do_sample=False
    )
    expected = model.generate(**batch, modality=torch.tensor([1, 0]), max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("kind", ["lavin", "crome", "crome-t5"])
def test_labels_may_be_the_input_ids_image_placeholders_are_not_predicted(tiny_backbones, tmp_path, kind):
    """`labels=input_ids` (a common first try) is a loss over the text: the image placeholder (past the LLM's
    vocabulary) is ignored at its positions, as LLaVA's training ignores image positions; before, an index error
    from inside the loss."""
    from conftest import save_tiny_t5

    from mmadapters import CromeForConditionalGeneration, CromeProcessor

    text_model = save_tiny_t5(tmp_path / "t5") if kind == "crome-t5" else tiny_backbones[0]
    model_class, processor_class = (
        (LavinForConditionalGeneration, LavinProcessor)
        if kind == "lavin"
        else (CromeForConditionalGeneration, CromeProcessor)
    )
    torch.manual_seed(0)
    model = model_class.from_backbones(text_model, tiny_backbones[1]).eval()
    processor = processor_class.from_model(model)
    image = (torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    batch = dict(processor(images=[[image]], text=["<image> what color?"]))
    labels = batch["input_ids"].clone()
    assert (labels == model.config.image_token_id).any()
    masked = labels.masked_fill(labels == model.config.image_token_id, -100)
    with torch.no_grad():
        loss = model(**batch, labels=labels).loss
        assert torch.isfinite(loss) and torch.equal(loss, model(**batch, labels=masked).loss)


@pytest.mark.parametrize("kind", ["crome", "crome-t5"])
def test_crome_labels_and_prompt_mask_of_another_shape_are_named(tiny_backbones, tmp_path, kind):
    """CROME's labels (the whole sequence for a decoder-only LLM, the answer for T5) of another batch or length
    stopped inside the loss with torch's batch-size message; a prompt_mask longer than the sequence ran, cut
    silently, and one of another batch stopped in a tensor operation."""
    from conftest import save_tiny_t5

    text_model = save_tiny_t5(tmp_path / "t5") if kind == "crome-t5" else tiny_backbones[0]
    model = CromeForConditionalGeneration.from_backbones(text_model, tiny_backbones[1]).eval()
    processor = CromeProcessor.from_model(model)
    image = (torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    batch = dict(
        processor(images=[[image], []], text=["<image> what color?", "hello"], answers=[" red", " hi"])
    )
    labels = batch.pop("labels")
    with torch.no_grad():
        assert torch.isfinite(model(**batch, labels=labels).loss)  # the processor's labels fit
        layout = "the answer's token ids" if kind == "crome-t5" else "the whole sequence"
        with pytest.raises(ValueError, match=f"labels has shape \\(1, {labels.shape[1]}\\) but .*{layout}"):
            model(**batch, labels=labels[:1])
        if kind == "crome":
            with pytest.raises(
                ValueError, match=f"labels has shape \\(2, {labels.shape[1] - 1}\\) but must be"
            ):
                model(**batch, labels=labels[:, :-1])
        mask = batch["prompt_mask"]
        for wrong in (mask[:1], torch.cat([mask, mask[:, :1]], dim=1)):
            with pytest.raises(
                ValueError, match=re.escape(f"prompt_mask has shape {tuple(wrong.shape)} but input_ids")
            ):
                model(**{**batch, "prompt_mask": wrong})


def corrupt_adapter(folder, how):
    path = folder / "mmadapters_model.safetensors"
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif how == "text":
        path.write_text("not a tensor file")
    else:
        tensors = load_file(path)
        name = sorted(tensors)[0]
        tensors[name] = (
            torch.full_like(tensors[name], float("nan")) if how == "nan" else tensors[name].to(torch.int32)
        )
        save_file(tensors, path, metadata={"format": "pt"})


def edit_adapter_settings(folder, **values):
    """Change the adapter settings recorded in config.json (where loading reads them)."""
    import json

    config = json.loads((folder / "config.json").read_text())
    config["adapter_config"].update(values)
    (folder / "config.json").write_text(json.dumps(config))


LOAD_CASES = {
    "empty adapter file": (lambda f: corrupt_adapter(f, "empty"), ValueError, "is empty \\(0 bytes\\)"),
    "truncated adapter file": (lambda f: corrupt_adapter(f, "truncated"), ValueError, "truncated or corrupt"),
    "text as adapter file": (lambda f: corrupt_adapter(f, "text"), ValueError, "truncated or corrupt"),
    "NaN adapter tensor": (lambda f: corrupt_adapter(f, "nan"), ValueError, "not finite"),
    "int32 adapter tensor": (lambda f: corrupt_adapter(f, "int32"), ValueError, "dtype torch.int32"),
    "no config.json": (lambda f: (f / "config.json").unlink(), FileNotFoundError, "no config.json"),
    "no adapter file": (
        lambda f: (f / "mmadapters_model.safetensors").unlink(),
        FileNotFoundError,
        "has a config.json but no weights: neither mmadapters_model.safetensors",
    ),
    "unknown adapter setting": (
        lambda f: edit_adapter_settings(f, rank=8),
        ValueError,
        "Unknown MMAdapterConfig field",
    ),
    "wrong adapter setting type": (
        lambda f: edit_adapter_settings(f, r="eight"),
        ValueError,
        "must be an integer",
    ),
}


@pytest.mark.parametrize("case", sorted(LOAD_CASES))
def test_broken_checkpoints_are_clear_errors(saved, tmp_path, case):
    folder = tmp_path / "ckpt"
    shutil.copytree(saved[0], folder)
    damage, error, message = LOAD_CASES[case]
    damage(folder)
    before = snapshot(folder)
    with pytest.raises(error, match=message):
        LavinForConditionalGeneration.from_pretrained(folder)
    assert snapshot(folder) == before


def test_a_checkpoint_of_another_kind_is_refused_before_anything_is_built(saved, tiny_backbones):
    """A backbone's folder where a checkpoint belongs was loaded as a LaVIN with the default (paper-size) backbones
    built from nothing: tens of gigabytes, the process killed for memory. Another method's checkpoint failed on
    its adapter settings. Both are refused by what config.json says."""
    with pytest.raises(
        CheckpointKindError, match="holds a 'llama' model, not a LaVIN checkpoint.*from_backbones"
    ):
        LavinForConditionalGeneration.from_pretrained(tiny_backbones[0])
    with pytest.raises(
        CheckpointKindError, match="holds a 'clip_vision_model' model, not a CROME checkpoint"
    ):
        CromeForConditionalGeneration.from_pretrained(tiny_backbones[1])
    with pytest.raises(
        CheckpointKindError, match="is a LaVIN checkpoint.*not a CROME one.*AutoModelForImageTextToText"
    ):
        CromeForConditionalGeneration.from_pretrained(saved[0])
    # The processors the same way (the LLM folder has a tokenizer, the tower's an image processor).
    with pytest.raises(CheckpointKindError, match="holds a 'llama' model, not a LaVIN checkpoint"):
        LavinProcessor.from_pretrained(tiny_backbones[0])
    with pytest.raises(
        CheckpointKindError, match="holds a 'clip_vision_model' model, not a LaVIN checkpoint"
    ):
        LavinProcessor.from_pretrained(tiny_backbones[1])
    with pytest.raises(CheckpointKindError, match="is a LaVIN checkpoint.*not a CROME one"):
        CromeProcessor.from_pretrained(saved[0])


def test_missing_folders_are_clear_errors(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint folder"):
        LavinForConditionalGeneration.from_pretrained(tmp_path / "nope")
    with pytest.raises(BackboneNotFoundError, match="pass text_model=|Pass text_model="):
        LavinForConditionalGeneration.from_pretrained(saved[0], text_model=str(tmp_path / "no-llm"))


def write_recipe(tmp_path, tiny_backbones, **changes):
    recipe = {
        "model": "lavin",
        "text_model": tiny_backbones[0],
        "vision_model": tiny_backbones[1],
        "data": {"name": "easy_vqa", "limit": 8},
        "output_dir": str(tmp_path / "run"),
        "training": {"max_steps": 2, "use_cpu": True},
    }
    for dotted, value in changes.items():
        target = recipe
        *parents, last = dotted.split(".")
        for key in parents:
            target = target.setdefault(key, {})
        target[last] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


RECIPE_CASES = {
    "training.max_steps": ("abc", "`training.max_steps` must be an integer"),
    "training.per_device_train_batch_size": (0, "must be at least 1"),
    "training.learning_rate": (-1.0, "must be positive"),
    "training.learning_rate ": ("fast", "must be a number"),
    # PyYAML reads `adam_epsilon: 1e-8` as text (YAML 1.1 numbers need a dot and a signed exponent)
    "training.adam_epsilon": (
        "1e-8",
        "must be a number, got '1e-8' \\(str\\): YAML reads 1e-8 as text, write 1.0e-8",
    ),
    "training.bf16": ("yes", "must be true or false"),
    "training.made_up": (1, "unknown field\\(s\\) \\['made_up'\\]"),
    "adapter.r": ("eight", "MMAdapterConfig.r must be an integer"),
    "adapter.dropout": (1.5, "dropout must be in"),
    "data.limit": ("abc", "`data.limit` must be a positive integer"),
    "data.limit ": (-3, "`data.limit` must be a positive integer"),
    "text_model": (12, "`text_model` must be a string"),
    "training.resume_from_checkpoint": (3, "must be true or a folder"),
}


@pytest.mark.parametrize("key", sorted(RECIPE_CASES))
def test_recipe_errors_name_the_key_before_any_model_loads(tiny_backbones, tmp_path, capsys, key):
    value, message = RECIPE_CASES[key]
    path = write_recipe(tmp_path, tiny_backbones, **{key.strip(): value})
    assert main(["train", str(path)]) == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)
    assert not os.path.exists(tmp_path / "run")


CLI_CASES = [
    (["eval", "CKPT", "--limit", "-3"], "--limit: expected a positive integer"),
    (["eval", "CKPT", "--limit", "many"], "--limit: expected a positive integer"),
    (["quickstart", "--batch-size", "0"], "--batch-size: expected a positive integer"),
    (["quickstart", "--train-steps", "-1"], "--train-steps: expected a positive integer"),
    (["quickstart", "--learning-rate", "0"], "--learning-rate: expected a positive number"),
    (["chat", "CKPT", "--max-new-tokens", "0"], "--max-new-tokens: expected a positive integer"),
    (["push", "CKPT", "me/repo", "--retries", "-1"], "--retries: expected an integer >= 0"),
]


@pytest.mark.parametrize("argv,message", CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES])
def test_cli_numbers_are_checked_before_anything_runs(saved, capsys, argv, message):
    argv = [str(saved[0]) if a == "CKPT" else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "is empty \\(0 bytes\\)"),
        (b"just some text\n", "not a PyTorch checkpoint"),
        (b"PK\x03\x04truncated", "truncated or corrupt"),
    ],
    ids=["empty", "text", "truncated zip"],
)
def test_convert_lavin_refuses_files_that_are_not_checkpoints(tmp_path, content, message):
    from mmadapters.convert.lavin_official import OfficialCheckpointError, load_official_checkpoint

    path = tmp_path / "checkpoint-19.pth"
    path.write_bytes(content)
    with pytest.raises(OfficialCheckpointError, match=message):
        load_official_checkpoint(path)
    assert path.read_bytes() == content


def test_chat_reports_a_line_that_is_not_utf8_and_goes_on(saved, monkeypatch, capsys):
    import io
    import sys

    class Stdin(io.TextIOWrapper):
        pass

    raw = io.BytesIO(b"\xff\xfe broken\nhello\n/quit\n")
    monkeypatch.setattr(sys, "stdin", Stdin(raw, encoding="utf-8"))
    assert main(["chat", str(saved[0]), "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "not UTF-8 text" in out
    assert (
        out.strip().splitlines()[-1]
        != "error: that line is not UTF-8 text; type it again (check the terminal's encoding)."
    )


@pytest.mark.parametrize("kind", ["lavin", "crome"])
@pytest.mark.parametrize("role", ["text", "vision"])
def test_a_backbone_of_the_wrong_kind_is_refused_before_it_loads(kind, role, tmp_path, monkeypatch):
    """Refused as a config, a folder (before its weights load) or a loaded model:
    - text: a vision-language model given as the LLM (Gemma 3 from 4B, Mistral Small 3.1, Llama 4, ...):
      transformers built the whole model, its own vision tower included, and composing the config failed with
      "'Gemma3Config' object has no attribute 'vocab_size'";
    - vision: SigLIP2's NaFlex towers, which need `pixel_attention_mask` and `spatial_shapes`: LaVIN was built and
      failed at its first forward inside transformers, CROME failed building its config with an AttributeError."""
    from conftest import tiny_text_config, tiny_vision_config
    from transformers import (
        AutoModelForCausalLM,
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Siglip2VisionModel,
    )

    from mmadapters import CromeForConditionalGeneration, LavinForConditionalGeneration

    if role == "text":
        config = Gemma3Config(
            text_config=tiny_text_config("gemma3").to_dict(),
            vision_config=tiny_vision_config("siglip", num_hidden_layers=2).to_dict(),
            mm_tokens_per_image=4,
        )
        model, loader = Gemma3ForConditionalGeneration(config), AutoModelForCausalLM
        message = r"vision-language model \(Gemma3Config holds a vision_config\).*text-only"
    else:
        config = tiny_vision_config("siglip2", num_hidden_layers=2)
        model, loader = Siglip2VisionModel(config), Siglip2VisionModel
        message = r"Siglip2VisionModel needs pixel_attention_mask, spatial_shapes.*fixed"
    model.save_pretrained(tmp_path / "backbone")

    def never(*args, **kwargs):
        raise AssertionError("the backbone's weights were loaded before the refusal")

    monkeypatch.setattr(loader, "from_pretrained", never)
    model_class = LavinForConditionalGeneration if kind == "lavin" else CromeForConditionalGeneration
    for backbone in (config, str(tmp_path / "backbone"), model):
        backbones = (backbone, tiny_vision_config()) if role == "text" else (tiny_text_config(), backbone)
        with pytest.raises(ValueError, match=message):
            model_class.from_backbones(*backbones)


@pytest.mark.parametrize("kind", ["lavin", "crome"])
def test_a_convolutional_tower_is_refused_before_it_loads(kind, tmp_path, monkeypatch):
    """ConvNeXt, EfficientNet, FocalNet and ALIGN's towers give feature maps, not patch tokens: their configs have
    no `hidden_size`. Before: the tower loaded, then the model's construction stopped with an AttributeError
    ("'ConvNextConfig' object has no attribute 'hidden_size'"), and the processors with another."""
    from conftest import save_tiny_llm, tiny_text_config
    from transformers import ConvNextConfig, ConvNextModel

    from mmadapters import (
        CromeForConditionalGeneration,
        CromeProcessor,
        LavinForConditionalGeneration,
        LavinProcessor,
    )

    config = ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=32)
    tower = ConvNextModel(config)
    tower.save_pretrained(tmp_path / "tower")
    save_tiny_llm(tmp_path / "llm")

    def never(*args, **kwargs):
        raise AssertionError("the tower's weights were loaded before the refusal")

    monkeypatch.setattr(ConvNextModel, "from_pretrained", never)
    model_class = LavinForConditionalGeneration if kind == "lavin" else CromeForConditionalGeneration
    processor_class = LavinProcessor if kind == "lavin" else CromeProcessor
    message = "ConvNextConfig has no hidden_size.*: LaVIN and CROME read the patch tokens of a ViT-style"
    for backbone in (config, str(tmp_path / "tower"), tower):
        with pytest.raises(ValueError, match=message):
            model_class.from_backbones(tiny_text_config(), backbone)
    with pytest.raises(ValueError, match=message):
        processor_class.from_backbones(str(tmp_path / "llm"), str(tmp_path / "tower"))


@pytest.mark.parametrize("tower", ["sam", "vitdet"])
def test_a_tower_that_ends_in_a_feature_map_is_named_before_the_qformer_reads_it(tower):
    """SAM's (and SAM-HQ's, PP-FormulaNet's) vision encoder and ViTDet have a hidden_size and layers, but return a
    feature map (images, channels, height, width), not patch tokens. LaVIN refuses them (no CLIP-style layers to put
    its adapters in); CROME stopped inside the Q-Former with a matrix-shape error from torch."""
    from conftest import tiny_qformer_config, tiny_text_config
    from transformers import SamVisionConfig, VitDetConfig

    from mmadapters import CromeForConditionalGeneration, LavinForConditionalGeneration

    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    if tower == "sam":
        config = SamVisionConfig(
            **sizes, output_channels=16, image_size=64, patch_size=16, mlp_dim=64, global_attn_indexes=[1]
        )
    else:
        config = VitDetConfig(
            **sizes, intermediate_size=64, image_size=32, pretrain_image_size=32, patch_size=8
        )
    with pytest.raises(ValueError, match="Cannot find CLIP/SigLIP-style encoder layers"):
        LavinForConditionalGeneration.from_backbones(tiny_text_config(), config)
    model = CromeForConditionalGeneration.from_backbones(
        tiny_text_config(), config, qformer=tiny_qformer_config(), num_query_tokens=4
    )
    side = config.image_size
    input_ids = torch.tensor([[1, 2] + [model.config.image_token_id] * model.config.num_image_tokens])
    with pytest.raises(ValueError, match=r"returned an output of shape \(1, \d+, 4, 4\), a feature map"):
        model(
            input_ids=input_ids,
            pixel_values=torch.zeros(1, 3, side, side),
            qformer_input_ids=torch.tensor([[1]]),
        )


@pytest.mark.parametrize("kind", ["lavin", "crome"])
def test_a_tower_that_reads_pre_cut_patches_is_refused_when_built(kind):
    """Molmo2's vision tower embeds patches with a linear layer: it reads images already cut into flattened patches
    (Molmo2's processor cuts them). Both models feed it whole images: CROME stopped at the first image with a
    matrix-shape error, LaVIN with a message about its layers."""
    import transformers
    from conftest import tiny_qformer_config, tiny_text_config

    from mmadapters import CromeForConditionalGeneration, LavinForConditionalGeneration

    if not hasattr(transformers, "Molmo2VisionConfig"):
        pytest.skip("this transformers release has no Molmo2")
    config = transformers.Molmo2VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        image_size=[32, 32],
        patch_size=8,
    )
    extra = {} if kind == "lavin" else dict(qformer=tiny_qformer_config(), num_query_tokens=4)
    model_class = LavinForConditionalGeneration if kind == "lavin" else CromeForConditionalGeneration
    with pytest.raises(
        ValueError, match=r"Molmo2VisionModel embeds patches with a linear layer \(patch_embedding\)"
    ):
        model_class.from_backbones(tiny_text_config(), config, **extra)


@pytest.mark.parametrize("kind", ["lavin", "crome"])
def test_an_llm_with_a_cache_of_its_own_is_refused_before_it_loads(kind):
    """The original MiniMax keeps the state of its linear-attention layers in a cache it makes itself. Before: built
    and trained, then `generate` stopped inside transformers ("MiniMax uses cache of its own and is not compatible
    with `cache` of type DynamicCache")."""
    from conftest import tiny_text_config, tiny_vision_config

    from mmadapters import CromeForConditionalGeneration, LavinForConditionalGeneration

    config = tiny_text_config("minimax")
    model_class = LavinForConditionalGeneration if kind == "lavin" else CromeForConditionalGeneration
    with pytest.raises(ValueError, match="MiniMaxForCausalLM keeps its state in a cache of its own"):
        model_class.from_backbones(config, tiny_vision_config())


@pytest.mark.parametrize("kind", ["lavin", "crome"])
def test_an_llm_that_routes_by_token_id_is_refused_before_it_loads(kind):
    """DeepSeek-V4's first layers route each token to experts by its token id (hash MoE): image features, given
    as embeddings, have none. Before: built, then transformers' router failed at the first forward with
    "'NoneType' object has no attribute 'reshape'". The same LLM with hidden-state routing works."""
    from conftest import tiny_text_config, tiny_vision_config

    from mmadapters import CromeForConditionalGeneration, LavinForConditionalGeneration

    def tiny_deepseek_v4(mlp_layer_types):
        return tiny_text_config("deepseek_v4", mlp_layer_types=mlp_layer_types)

    model_class = LavinForConditionalGeneration if kind == "lavin" else CromeForConditionalGeneration
    extra = {"num_query_tokens": 4} if kind == "crome" else {}
    with pytest.raises(ValueError, match=r"routes the tokens of layers \[0\] to experts by token id"):
        model_class.from_backbones(tiny_deepseek_v4(["hash_moe", "moe"]), tiny_vision_config(), **extra)
    model = model_class.from_backbones(tiny_deepseek_v4(["moe", "moe"]), tiny_vision_config(), **extra)
    ids = torch.tensor([[1] + [model.config.image_token_id] * model.config.num_image_tokens + [5, 6, 7]])
    inputs = {"input_ids": ids, "pixel_values": torch.randn(1, 3, 32, 32), "labels": ids}
    if kind == "crome":
        inputs.update(qformer_input_ids=torch.tensor([[1, 2, 3]]), prompt_mask=torch.ones_like(ids))
    assert torch.isfinite(model(**inputs).loss)


@pytest.mark.parametrize("kind", ["lavin", "crome"])
@pytest.mark.parametrize("model_type", ["minicpm_ocr_vision", "paddleocr_vl_vision", "pixtral"])
def test_a_tower_that_needs_its_patch_grid_is_refused_when_built(kind, model_type):
    """MiniCPM-o/V and PaddleOCR-VL towers declare `target_sizes` / `grid_thw` optional but need them (they read
    packed variable-resolution patches). Before: built, then an AttributeError ("'NoneType' object has no attribute
    'device'") or an unpacking error from inside transformers at the first image. Pixtral's tower packs the patches
    of every image of a batch into one sequence (`image_sizes`): CROME stopped at a batch of two images with torch's
    "Sizes of tensors must match"."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from mmadapters import CromeForConditionalGeneration, LavinForConditionalGeneration

    if model_type not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"this transformers release has no {model_type}")
    config = AutoConfig.for_model(
        model_type,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    from conftest import tiny_text_config

    model_class = LavinForConditionalGeneration if kind == "lavin" else CromeForConditionalGeneration
    needs = {"minicpm_ocr_vision": "target_sizes", "pixtral": "image_sizes"}.get(model_type, "grid_thw")
    with pytest.raises(ValueError, match=f"needs {needs} besides pixel values.*fixed"):
        model_class.from_backbones(tiny_text_config(), config)


@pytest.mark.parametrize("kind", ["lavin", "crome"])
@pytest.mark.parametrize("role", ["text", "vision"])
def test_a_backbone_checkpoint_that_lacks_the_towers_weights_is_refused(kind, role, tmp_path):
    """A checkpoint whose weights do not fill the backbone: a full SmolVLM given as the vision tower (its tower's
    weights sit under `model.vision_model.`), a bare LlamaModel without its LM head given as the LLM. Before:
    transformers printed a load report and initialised what it did not find at random, and the frozen backbone
    stayed random for good."""
    from conftest import make_tokenizer, tiny_qformer_config, tiny_text_config, tiny_vision_config
    from transformers import LlamaModel, SmolVLMConfig, SmolVLMForConditionalGeneration

    from mmadapters import CromeForConditionalGeneration, LavinForConditionalGeneration

    text = tiny_text_config(tie_word_embeddings=False)
    if role == "vision":
        config = SmolVLMConfig(
            vision_config=tiny_vision_config("smolvlm").to_dict(), text_config=text.to_dict(), scale_factor=2
        )
        SmolVLMForConditionalGeneration(config).save_pretrained(tmp_path / "backbone")
        backbones, missing = (text, str(tmp_path / "backbone")), "embeddings.patch_embedding.weight"
    else:
        LlamaModel(text).save_pretrained(tmp_path / "backbone")
        make_tokenizer().save_pretrained(tmp_path / "backbone")
        backbones, missing = (str(tmp_path / "backbone"), tiny_vision_config()), "lm_head.weight"
    model_class = LavinForConditionalGeneration if kind == "lavin" else CromeForConditionalGeneration
    extra = {} if kind == "lavin" else {"qformer": tiny_qformer_config(), "num_query_tokens": 4}
    with pytest.raises(ValueError, match=f"{role} backbone.*does not hold.*{re.escape(missing)}"):
        model_class.from_backbones(*backbones, **extra)


@pytest.mark.parametrize("kind", ["lavin", "crome"])
@pytest.mark.parametrize("tower", ["clip", "siglip", "blip"])
def test_images_of_another_size_than_a_fixed_size_tower_takes_are_named(kind, tower):
    """Towers that only interpolate their position embeddings when asked (`interpolate_pos_encoding`) take images of
    their config's size. Before: SigLIP and BLIP towers stopped inside torch ("The size of tensor a (64) must match
    the size of tensor b (16)"). Asked to interpolate, LaVIN's features run; a tower that takes any size itself
    (Idefics3's) is not refused."""
    from conftest import tiny_qformer_config, tiny_text_config, tiny_vision_config

    from mmadapters import CromeForConditionalGeneration, LavinForConditionalGeneration

    if kind == "lavin":
        model = LavinForConditionalGeneration.from_backbones(tiny_text_config(), tiny_vision_config(tower))
        features = lambda pixels, **kw: model.get_image_features(pixels, **kw)  # noqa: E731
    else:
        model = CromeForConditionalGeneration.from_backbones(
            tiny_text_config(),
            tiny_vision_config(tower),
            qformer=tiny_qformer_config(300),
            num_query_tokens=4,
        )
        features = lambda pixels, **kw: model.get_image_features(pixels, torch.tensor([[1, 5]]), **kw)  # noqa: E731
    message = "pixel_values hold 64x48 images, but the vision tower .* takes 32x32.*processor"
    with pytest.raises(ValueError, match=message):
        features(torch.randn(1, 3, 64, 48))
    ids = torch.tensor([[1] + [model.config.image_token_id] * model.config.num_image_tokens + [5]])
    with pytest.raises(ValueError, match=message):
        model(input_ids=ids, pixel_values=torch.randn(1, 3, 64, 48))
    if kind == "lavin" and tower == "siglip":
        assert features(torch.randn(1, 3, 64, 48), interpolate_pos_encoding=True).pooler_output.shape == (
            1,
            2,
            32,
        )
    if kind == "lavin" and tower == "clip":
        idefics3 = LavinForConditionalGeneration.from_backbones(
            tiny_text_config(), tiny_vision_config("idefics3")
        )
        assert idefics3.image_tokens(torch.randn(1, 3, 64, 48)).shape == (1, 2, 32)


@pytest.mark.parametrize("kind", ["lavin", "crome"])
@pytest.mark.parametrize("given", ["CLIPTextConfig", "BertConfig"])
def test_a_text_encoder_given_as_the_vision_tower_is_refused_when_built(kind, given):
    """A model that reads no pixels (CLIP's text half, BERT) given as the vision tower. Before: LaVIN and CROME were
    built around CLIP's text encoder (CROME around BERT too) and stopped at the first image inside the tower."""
    import transformers
    from conftest import tiny_qformer_config, tiny_text_config

    from mmadapters import CromeForConditionalGeneration, LavinForConditionalGeneration

    config = getattr(transformers, given)(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2
    )
    model_class = LavinForConditionalGeneration if kind == "lavin" else CromeForConditionalGeneration
    extra = {} if kind == "lavin" else {"qformer": tiny_qformer_config(), "num_query_tokens": 4}
    with pytest.raises(ValueError, match="is not a vision tower: its forward takes no pixel_values"):
        model_class.from_backbones(tiny_text_config(), config, **extra)
    model = getattr(transformers, given.replace("Config", "Model"))(config)
    with pytest.raises(ValueError, match="is not a vision tower: its forward takes no pixel_values"):
        model_class.from_backbones(tiny_text_config(), model, **extra)


def test_a_model_without_a_language_modelling_head_given_as_the_llm_is_named_briefly():
    """A vision tower's config given as the LLM. Before: transformers' "Unrecognized configuration class ... for this
    kind of AutoModel", followed by every one of its hundreds of config classes."""
    from conftest import tiny_vision_config

    from mmadapters import LavinForConditionalGeneration

    with pytest.raises(ValueError, match="CLIPVisionConfig is not the config of a language model") as raised:
        LavinForConditionalGeneration.from_backbones(tiny_vision_config(), tiny_vision_config())
    assert len(str(raised.value)) < 400 and "the order is text_model, vision_model" in str(raised.value)


@pytest.mark.parametrize("kind", ["lavin", "crome"])
def test_a_model_config_with_its_backbone_configs_in_the_other_order_is_named(kind):
    """`LavinConfig(text_config=vision, vision_config=text)` (or CROME's). Before: "AttributeError: 'CLIPVisionConfig'
    object has no attribute 'vocab_size'"."""
    from conftest import tiny_qformer_config, tiny_text_config, tiny_vision_config

    from mmadapters import CromeConfig, LavinConfig

    config_class, extra = (
        (LavinConfig, {}) if kind == "lavin" else (CromeConfig, {"qformer_config": tiny_qformer_config()})
    )
    expected = r"text_config is a CLIPVisionConfig, which has no vocabulary \(a vision tower's\? the order is text_config"
    for text_config in (tiny_vision_config(), tiny_vision_config().to_dict()):
        with pytest.raises(ValueError, match=expected):
            config_class(text_config=text_config, vision_config=tiny_text_config(), **extra)
