"""Conversion of official LaVIN checkpoints (issue: Hub sharing and conversion, item 4).

The reference below is the official forward written from the spec (LAVIN.md sections 1-4 and 9): adapters as
kernel-1 Conv1d modules under the official names, the ViT adapters working in the official (L, N, D) layout
(routing every image by image 0), the modality embedding prepended with the official mask.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pickle

import pytest
import torch
from conftest import save_llm_with_width, save_tiny_llm
from torch import nn
from transformers import AutoModelForCausalLM, CLIPVisionModel

from mmadapters import LavinForConditionalGeneration, LavinProcessor
from mmadapters.cli import main
from mmadapters.convert.lavin_official import OfficialCheckpointError, convert_official_lavin

R, GROUPS, SCALE, TEMPERATURE, PROJ_HIDDEN = 8, 2, 1.0, 5.0, 16


class OfficialRepAdapterRouter(nn.Module):
    """The official MM-Adapter: Conv1d(kernel 1) down-projection, two grouped Conv1d experts, a linear router."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv_A = nn.Conv1d(width, R, 1, groups=1, bias=True)
        self.conv_B = nn.Conv1d(R, width, 1, groups=GROUPS, bias=True)
        self.conv_D = nn.Conv1d(R, width, 1, groups=GROUPS, bias=True)
        self.expert_weights = nn.Linear(width, 2)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (batch, length, channels); the router reads x[:, 0] whatever the layout calls "batch".
        weights = torch.softmax(self.expert_weights(x[:, 0]) / TEMPERATURE, dim=-1)
        h = x.transpose(1, 2)
        hidden = self.dropout(self.conv_A(h))
        out = (
            self.conv_B(hidden) * SCALE * weights[:, 0, None, None]
            + self.conv_D(hidden) * SCALE * weights[:, 1, None, None]
            + h
        )
        return out.transpose(1, 2).contiguous()


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.adapter_attn = OfficialRepAdapterRouter(width)


class OfficialLavinAdapters(nn.Module):
    """Holds the trainable tensors under the official names (`layers.*`, `backbone.visual.*`, ...)."""

    def __init__(self, llm_layers: int, llm_width: int, vision_layers: int, vision_width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(llm_width) for _ in range(llm_layers))
        self.backbone = nn.Module()
        self.backbone.visual = nn.Module()
        self.backbone.visual.transformer = nn.Module()
        self.backbone.visual.transformer.resblocks = nn.ModuleList(
            Block(vision_width) for _ in range(vision_layers)
        )
        self.adapter_proj = nn.Module()
        self.adapter_proj.conv_A = nn.Linear(vision_width, PROJ_HIDDEN)
        self.adapter_proj.conv_B = nn.Linear(PROJ_HIDDEN, llm_width)
        self.adapter_modality_embedding = nn.Embedding(2, llm_width)
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():  # trained-looking values everywhere (the experts are zero at init)
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)

    @torch.no_grad()
    def logits(self, llm, vision, input_ids, pixel_values, image_token_id, feature_layers):
        handles = []
        for layer, block in zip(llm.model.layers, self.layers, strict=True):

            def pre_hook(module, args, kwargs, adapter=block.adapter_attn):
                kwargs["hidden_states"] = adapter(kwargs["hidden_states"])  # routed by position 0
                return args, kwargs

            handles.append(layer.self_attn.register_forward_pre_hook(pre_hook, with_kwargs=True))
        for layer, block in zip(
            vision.encoder.layers, self.backbone.visual.transformer.resblocks, strict=True
        ):

            def norm_hook(module, args, output, adapter=block.adapter_attn):
                # The official ViT runs in (L, N, D): the adapter's x[:, 0] is then image 0's tokens.
                return adapter(output.transpose(0, 1)).transpose(0, 1)

            handles.append(layer.layer_norm1.register_forward_hook(norm_hook))
        try:
            embeds = llm.get_input_embeddings()(input_ids.masked_fill(input_ids == image_token_id, 0))
            image_mask = input_ids == image_token_id
            if pixel_values is not None:
                states = vision(pixel_values=pixel_values, output_hidden_states=True).hidden_states
                cls = torch.stack([states[layer][:, 0] for layer in feature_layers], dim=1)
                proj = self.adapter_proj.conv_B(nn.functional.silu(self.adapter_proj.conv_A(cls)))
                embeds[image_mask] = proj.reshape(-1, proj.shape[-1])
            modality = image_mask.any(dim=-1).long()
            x = torch.cat([self.adapter_modality_embedding(modality)[:, None], embeds], dim=1)
            length = x.shape[1]
            allowed = torch.tril(torch.ones(length, length, dtype=torch.bool))
            allowed[1:, 0] = False  # nothing attends to the modality token
            mask = torch.zeros(length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)
            mask = mask[None, None].expand(x.shape[0], 1, length, length)
            out = llm(inputs_embeds=x, attention_mask=mask, position_ids=torch.arange(length)[None])
            return out.logits[:, 1:]
        finally:
            for handle in handles:
                handle.remove()


@pytest.fixture()
def official(tiny_backbones, tmp_path):
    llm = AutoModelForCausalLM.from_pretrained(tiny_backbones[0]).eval()
    vision = CLIPVisionModel.from_pretrained(tiny_backbones[1]).eval()
    reference = OfficialLavinAdapters(
        llm.config.num_hidden_layers,
        llm.config.hidden_size,
        vision.config.num_hidden_layers,
        vision.config.hidden_size,
    ).eval()
    path = tmp_path / "checkpoint-19.pth"
    torch.save(
        {
            "model": {f"module.{k}": v for k, v in reference.state_dict().items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 9e-3}]},
            "epoch": 19,
            "scaler": {"scale": 65536.0},
            "args": argparse.Namespace(
                adapter_scale=SCALE, temperature=TEMPERATURE, adapter_dim=R, llm_model="7B"
            ),
        },
        path,
    )
    return reference, llm, vision, str(path)


def sample_batch(model, processor):
    generator = torch.Generator().manual_seed(0)
    images = [(torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8).numpy() for _ in range(2)]
    return processor(images=[[images[0]], [images[1]]], text=["Image: <image> what color?"] * 2)


def official_logits(reference, llm, vision, model, inputs):
    """The official forward's logits for `inputs` (with images), placed as `model` places its visual tokens."""
    return reference.logits(
        llm,
        vision,
        inputs["input_ids"],
        inputs["pixel_values"],
        model.config.image_token_id,
        model.config.vision_feature_layers,
    )


def test_converted_official_checkpoint_gives_the_official_logits(official, tiny_backbones):
    reference, llm, vision, path = official
    model, processor, report = convert_official_lavin(path, *tiny_backbones)
    assert report.mapped == len(model.adapter_state_dict()) and not report.unmapped and not report.missing
    assert model.config.mm_adapter_config.temperature == TEMPERATURE
    assert model.config.mm_adapter_config.official_vision_routing
    assert model.config.projector_hidden_size == PROJ_HIDDEN

    batch = sample_batch(model, processor)  # two images: the official ViT routes both by image 0
    text = processor(text=["Image: N/A the capital of france is"])
    layers = model.config.vision_feature_layers
    with torch.no_grad():
        ours_batch = model(**batch).logits
        for inputs in (batch, text):
            ours = model(**inputs).logits
            expected = reference.logits(
                llm,
                vision,
                inputs["input_ids"],
                inputs.get("pixel_values"),
                model.config.image_token_id,
                layers,
            )
            torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
        # The parity flag matters: routing each image by itself changes the second image's logits.
        for adapter in model.vision_adapters:
            adapter.official_routing = False
        assert not torch.allclose(model(**batch).logits[1], ours_batch[1], atol=1e-4)


def test_convert_lavin_cli_writes_a_loadable_checkpoint(official, tiny_backbones, tmp_path, capsys):
    reference, llm, vision, path = official
    out = tmp_path / "converted"
    assert (
        main(["convert-lavin", path, "--llm", tiny_backbones[0], "--vision", tiny_backbones[1], str(out)])
        == 0
    )
    assert "mapped" in capsys.readouterr().out
    model = LavinForConditionalGeneration.from_pretrained(out)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(out)
    inputs = sample_batch(model, processor)
    with torch.no_grad():
        expected = official_logits(reference, llm, vision, model, inputs)
        torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-5, rtol=0)


def test_a_converted_checkpoint_saved_without_its_processor_gets_the_official_one_back(
    official, tiny_backbones, tmp_path
):
    """The official preprocessing (ImageNet statistics, no crop) and tokenisation that a converted checkpoint needs
    are recorded in its config (`official_processing`): a processor rebuilt for it (saved without one, or
    `from_model`) was the default one, with other pixel values and token ids, and nothing said so."""
    from transformers import AutoProcessor

    model, processor, _ = convert_official_lavin(official[3], *tiny_backbones)
    assert model.config.official_processing is True
    model.save_pretrained(tmp_path / "without-processor")
    expected = sample_batch(model, processor)
    for rebuilt in (
        AutoProcessor.from_pretrained(tmp_path / "without-processor"),
        LavinProcessor.from_model(
            LavinForConditionalGeneration.from_pretrained(tmp_path / "without-processor")
        ),
    ):
        assert rebuilt.official_tokenization
        got = sample_batch(model, rebuilt)
        assert all(torch.equal(got[key], expected[key]) for key in expected)


class Payload:
    """Would run code when unpickled, if the loader allowed it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_refuses_objects_outside_the_allow_list(tmp_path, tiny_backbones):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": {}, "args": Payload(str(marker))}, f)
    with pytest.raises(OfficialCheckpointError, match="allow-list"):
        convert_official_lavin(path, *tiny_backbones)
    assert not marker.exists()


def test_reports_unmapped_and_missing_keys(official, tiny_backbones, tmp_path):
    reference, llm, vision, path = official
    payload = torch.load(path, weights_only=False)
    payload["model"]["module.layers.0.adapter_attn.conv_X.weight"] = torch.zeros(1)
    del payload["model"]["module.adapter_modality_embedding.weight"]
    broken = tmp_path / "broken.pth"
    torch.save(payload, broken)
    with pytest.raises(OfficialCheckpointError) as error:
        convert_official_lavin(broken, *tiny_backbones)
    assert "conv_X" in str(error.value) and "modality_embedding.weight" in str(error.value)


def test_refuses_another_backbone(official, tiny_backbones, tmp_path):
    reference, llm, vision, path = official
    wider = save_tiny_llm(tmp_path / "other", kind="llama")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(wider)
    config.hidden_size, config.intermediate_size = 64, 96
    AutoModelForCausalLM.from_config(config).save_pretrained(wider)
    with pytest.raises(OfficialCheckpointError, match="trained on other backbones"):
        convert_official_lavin(path, wider, tiny_backbones[1])


def test_not_a_lavin_checkpoint(tmp_path, tiny_backbones):
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(OfficialCheckpointError, match="expected a dict with a `model`"):
        convert_official_lavin(path, *tiny_backbones)
    with pytest.raises(FileNotFoundError):
        convert_official_lavin(tmp_path / "missing.pth", *tiny_backbones)


def test_official_routing_replicates_batch_item_zero_of_the_official_evaluation(official, tiny_backbones):
    """The official evaluation routes every image by batch item 0's image, an all-zero image when item 0 is a
    text-only question: a mixed batch starting with a text-only question is routed by a zero image."""
    reference, llm, vision, path = official
    model, processor, _ = convert_official_lavin(path, *tiny_backbones)
    generator = torch.Generator().manual_seed(3)
    picture = (torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8).numpy()
    batch = processor(images=[[], [picture]], text=["Image: N/A say hi", "Image: <image> what color?"])
    with torch.no_grad():
        placed = model(**batch).image_hidden_states[0]
        pixels = batch["pixel_values"]
        by_zero = model.image_tokens(torch.cat([torch.zeros_like(pixels), pixels]))[1]
        by_itself = model.image_tokens(pixels)[0]
    torch.testing.assert_close(placed, by_zero)
    assert not torch.allclose(placed, by_itself, atol=1e-4)  # the zero image's routing does change the tokens


def test_converted_checkpoint_answers_scienceqa_prompts_as_the_official_forward(official, tiny_backbones):
    """Greedy answers to ScienceQA-format prompts (an image question and a text-only one), token by token: ours
    (generate, with the KV cache) against a greedy loop over the reference official forward."""
    from mmadapters.data import scienceqa_example

    reference, llm, vision, path = official
    model, processor, _ = convert_official_lavin(path, *tiny_backbones)
    assert processor.official_tokenization
    generator = torch.Generator().manual_seed(5)
    picture = (torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8).numpy()
    row = {"question": "Which color?", "hint": "", "choices": ["red", "blue"], "answer": 0, "lecture": "",
           "solution": ""}  # fmt: skip
    for image in (picture, None):
        example = scienceqa_example({**row, "image": image})
        inputs = processor(images=[[image] if image is not None else []], text=[example["prompt"]])
        with torch.no_grad():
            ours = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
            ids = inputs["input_ids"]
            for _ in range(5):
                logits = reference.logits(
                    llm, vision, ids, inputs.get("pixel_values"), model.config.image_token_id,
                    model.config.vision_feature_layers,
                )  # fmt: skip
                ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
        assert ours[0].tolist() == ids[0].tolist()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_a_lavin_lite_checkpoint_converts_with_its_llm_quantised_as_the_official_code_did(
    tiny_backbones, tmp_path, capsys
):
    """Official LaVIN-lite (`--bits 4bit`): the adapters were trained on an LLM quantised by bitsandbytes (nf4,
    double quantisation, float16 compute). The conversion records that quantisation, so the converted model (and
    every load of it) computes what the official model computes on the quantised LLM."""
    from transformers import BitsAndBytesConfig

    from mmadapters.modeling.backbone_watch import keep_quantized_weights_in_place

    llm_path = save_llm_with_width(tmp_path / "llm64")  # bitsandbytes' CPU 4-bit kernels need width >= 64
    official_setup = BitsAndBytesConfig(  # LaVIN's util/quantization.py
        load_in_4bit=True,
        llm_int8_threshold=6.0,
        llm_int8_has_fp16_weight=False,
        bnb_4bit_compute_dtype=torch.float16,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_type="nf4",
    )
    quantised_llm = AutoModelForCausalLM.from_pretrained(llm_path, quantization_config=official_setup).eval()
    keep_quantized_weights_in_place(quantised_llm)  # as our backbones: no bfloat16 CPU repacking
    vision = CLIPVisionModel.from_pretrained(tiny_backbones[1]).eval()
    torch.manual_seed(0)
    reference = OfficialLavinAdapters(
        quantised_llm.config.num_hidden_layers,
        quantised_llm.config.hidden_size,
        vision.config.num_hidden_layers,
        vision.config.hidden_size,
    ).eval()
    path = tmp_path / "checkpoint-19.pth"
    args = argparse.Namespace(adapter_scale=SCALE, temperature=TEMPERATURE, llm_model="7B", bits="4bit")
    torch.save({"model": reference.state_dict(), "epoch": 19, "args": args}, path)
    out = tmp_path / "converted"
    assert main(["convert-lavin", str(path), "--llm", llm_path, "--vision", tiny_backbones[1], str(out)]) == 0
    assert "LaVIN-lite: the LLM is quantised to 4bit" in capsys.readouterr().out
    model = LavinForConditionalGeneration.from_pretrained(out)
    record = model.config.backbone_quantization["text_config"]
    assert (
        record["load_in_4bit"]
        and record["bnb_4bit_quant_type"] == "nf4"
        and record["bnb_4bit_use_double_quant"]
    )
    assert record["bnb_4bit_compute_dtype"] == "float16"
    from transformers import AutoProcessor

    inputs = sample_batch(model, AutoProcessor.from_pretrained(out))
    with torch.no_grad():
        expected = official_logits(reference, quantised_llm, vision, model, inputs)
        # float16 compute inside the 4-bit layers: rounding differs with the order of operations
        torch.testing.assert_close(model.eval()(**inputs).logits, expected, atol=5e-4, rtol=0)


def test_a_checkpoint_trained_on_vicuna_says_so_when_converted_onto_another_llm(
    official, tiny_backbones, tmp_path
):
    """Vicuna has LLaMA's shapes: nothing in the weights shows the mismatch, the saved args do."""
    payload = torch.load(official[3], weights_only=False)
    payload["args"].use_vicuna = True
    torch.save(payload, tmp_path / "vicuna.pth")
    _, _, report = convert_official_lavin(tmp_path / "vicuna.pth", *tiny_backbones)
    assert any("trained on Vicuna (args.use_vicuna)" in note for note in report.notes)
    assert "trained on Vicuna" in report.summary()
    _, _, plain = convert_official_lavin(official[3], *tiny_backbones)
    assert plain.notes == []
