"""Adapter-only checkpoints, backbone fingerprints, Auto classes and the pipeline (issue: foundation, item 5)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from conftest import save_tiny_llm, tiny_sample_inputs, tiny_text_config, tiny_vision_config
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, pipeline

from mmadapters import (
    BackboneMismatchError,
    LavinConfig,
    LavinForConditionalGeneration,
    LavinProcessor,
    MMAdapterConfig,
)
from mmadapters.checkpoint_files import ADAPTER_WEIGHTS_NAME
from mmadapters.modeling.peft_on_top import PeftOnTopError


def image(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8).numpy()


@pytest.fixture()
def trained(tiny_backbones, randomize_adapters):
    """A model whose adapters differ from their initialisation, with its processor."""
    torch.manual_seed(0)
    model = LavinForConditionalGeneration.from_backbones(
        *tiny_backbones, adapter_config=MMAdapterConfig(temperature=5.0)
    ).eval()
    randomize_adapters(model, std=0.3)
    return model, LavinProcessor.from_backbones(*tiny_backbones)


def sample_inputs(processor):
    return processor(
        images=[[image(0)], []], text=["Image: <image>\nwhat color is it?", "Image: N/A\nthe capital of"]
    )


def test_adapter_only_round_trip(trained, tmp_path):
    model, processor = trained
    model.save_pretrained(tmp_path, processor=processor)
    files = set(os.listdir(tmp_path))
    assert {
        "config.json",
        "mmadapters_model.safetensors",
        "processor_config.json",
    } <= files
    assert "model.safetensors" not in files and "adapter_config.json" not in files  # PEFT's name: never ours
    with safe_open(tmp_path / "mmadapters_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys == set(model.adapter_state_dict())
    assert all(
        k.split(".")[0] in ("llm_adapters", "vision_adapters", "projector", "modality_embedding")
        for k in keys
    )
    assert sum(model.adapter_state_dict()[k].numel() for k in keys) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["text_backbone"]["name_or_path"].endswith("llm") and config["text_backbone"]["fingerprint"]
    assert config["adapter_config"]["temperature"] == 5.0

    loaded = LavinForConditionalGeneration.from_pretrained(tmp_path)
    assert not loaded.training
    inputs = sample_inputs(processor)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(loaded.generate(**inputs, **kwargs), model.generate(**inputs, **kwargs))


def test_save_pretrained_keywords_are_honoured_or_refused(trained, tmp_path):
    """transformers' save_pretrained keywords: is_main_process and state_dict honoured (the Trainer passes the
    state dict it gathered under FSDP / ZeRO-3), push_to_hub and the full-checkpoint options refused up front."""
    model, _ = trained
    model.save_pretrained(tmp_path / "other", is_main_process=False)
    assert not (tmp_path / "other").exists()
    model.save_pretrained(
        tmp_path / "token", token="hf_unused"
    )  # only push_to_hub reads it, as in transformers
    assert (tmp_path / "token" / ADAPTER_WEIGHTS_NAME).is_file()

    # An adapter-only save takes the adapter tensors from the given state dict, not from the live module.
    gathered = {k: v.clone() for k, v in model.state_dict().items()}
    name = "llm_adapters.0.attn.down.weight"
    gathered[name] += 1.0
    model.save_pretrained(tmp_path / "gathered", state_dict=gathered)
    loaded = LavinForConditionalGeneration.from_pretrained(tmp_path / "gathered")
    torch.testing.assert_close(loaded.state_dict()[name], gathered[name], rtol=0, atol=0)
    assert not torch.equal(model.state_dict()[name], gathered[name])
    # ... and checks the backbones in it: a change there would be lost by an adapter-only checkpoint.
    backbone = "language_model.model.layers.0.mlp.up_proj.weight"
    gathered[backbone] = gathered[backbone] + 1.0
    partial = {k: v for k, v in model.state_dict().items() if not k.startswith("llm_adapters.")}
    with pytest.raises(PeftOnTopError, match="backbone weights changed"):
        model.save_pretrained(tmp_path / "changed", state_dict=gathered)
    with pytest.raises(ValueError, match="holds no tensors of .*llm_adapters"):
        model.save_pretrained(tmp_path / "partial", state_dict=partial)
    with pytest.raises(ValueError, match="is empty.*stage3_gather_16bit_weights_on_model_save"):
        model.save_pretrained(tmp_path / "partial", state_dict={})

    with pytest.raises(ValueError, match=r"push_to_hub=True\) is not supported.*model.push_to_hub"):
        model.save_pretrained(tmp_path / "push", push_to_hub=True)
    for option in ({"variant": "fp16"}, {"safe_serialization": False}):
        with pytest.raises(ValueError, match="applies to full checkpoints.*adapter_only=False"):
            model.save_pretrained(tmp_path / "options", **option)
    # max_shard_size: the adapter file is one shard; a limit it exceeds (or no size at all) is refused.
    with pytest.raises(
        ValueError, match=r"adapter file would be [\d,]+ bytes, more than max_shard_size='1KB'"
    ):
        model.save_pretrained(tmp_path / "options", max_shard_size="1KB")
    with pytest.raises(ValueError, match="max_shard_size='5 potatoes' is not a size"):
        model.save_pretrained(tmp_path / "options", max_shard_size="5 potatoes")
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['shard_size'\]"):
        model.save_pretrained(tmp_path / "options", shard_size="1GB")
    assert not any((tmp_path / name).exists() for name in ("changed", "partial", "push", "options"))
    for size in ("5GB", "500MiB", 10**9):  # what generic scripts pass: one file, as without it
        model.save_pretrained(tmp_path / f"sharded-{size}", max_shard_size=size)
        assert sorted(os.listdir(tmp_path / f"sharded-{size}")) == sorted(os.listdir(tmp_path / "token"))
    # A full save passes them on to transformers.
    model.save_pretrained(tmp_path / "full", adapter_only=False, max_shard_size="100KB")
    assert (tmp_path / "full" / "model.safetensors.index.json").is_file()


def test_full_checkpoint_round_trip(trained, tmp_path):
    model, processor = trained
    model.save_pretrained(tmp_path, adapter_only=False)
    assert os.path.isfile(tmp_path / "model.safetensors")
    loaded = LavinForConditionalGeneration.from_pretrained(tmp_path)
    inputs = sample_inputs(processor)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "lost", ["language_model.model.layers.0.input_layernorm.weight", "vision_tower.post_layernorm.bias"]
)
def test_a_full_checkpoint_that_lost_a_backbone_weight_is_refused(trained, tmp_path, lost):
    """A full checkpoint (model.safetensors) without one of its backbones' weights (a copy that was cut, a file
    edited by hand). Before: transformers initialised it at random, only printing a load report, and the frozen
    backbone stayed so. (A module of ours it lacks gets its initialisation, as in transformers: see
    test_loading.py::test_missing_adapter_tensor_in_full_checkpoint_gets_its_initialisation.)"""
    from safetensors.torch import load_file, save_file

    from mmadapters.checkpoint_files import MissingWeightsError

    model, _ = trained
    model.save_pretrained(tmp_path, adapter_only=False)
    weights = load_file(tmp_path / "model.safetensors")
    del weights[lost]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    for output_loading_info in (False, True):
        with pytest.raises(
            MissingWeightsError, match=f"does not hold every weight.*{re.escape(lost)}.*random"
        ):
            LavinForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=output_loading_info)


def test_config_built_model_saves_every_weight_and_reloads_identically(tmp_path, randomize_adapters):
    # Backbones built from config objects cannot be found again by name: save_pretrained writes every weight
    # (as any transformers model would) instead of refusing, and the reload is exact.
    torch.manual_seed(0)
    model = randomize_adapters(
        LavinForConditionalGeneration.from_backbones(tiny_text_config(), tiny_vision_config())
    )
    model.eval().save_pretrained(tmp_path)
    assert "model.safetensors" in os.listdir(tmp_path) and "mmadapters_model.safetensors" not in os.listdir(
        tmp_path
    )
    loaded = LavinForConditionalGeneration.from_pretrained(tmp_path)
    ids = torch.tensor([[1, 40, 50, 60]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_mismatched_backbone_is_refused(trained, tmp_path, tiny_backbones):
    model, processor = trained
    model.save_pretrained(tmp_path / "ckpt")
    other_llm = save_tiny_llm(tmp_path / "other_llm", seed=123)
    with pytest.raises(BackboneMismatchError) as error:
        LavinForConditionalGeneration.from_pretrained(tmp_path / "ckpt", text_model=other_llm)
    message = str(error.value)
    assert tiny_backbones[0] in message and other_llm in message and "ignore_backbone_mismatch" in message
    # An explicit override loads anyway.
    loaded = LavinForConditionalGeneration.from_pretrained(
        tmp_path / "ckpt", text_model=other_llm, ignore_backbone_mismatch=True
    )
    assert torch.equal(
        loaded.llm_adapters[0].attn.expert_b.weight, model.llm_adapters[0].attn.expert_b.weight
    )
    # The same backbone at another location is accepted.
    moved = save_tiny_llm(tmp_path / "moved_llm", seed=0)
    LavinForConditionalGeneration.from_pretrained(tmp_path / "ckpt", text_model=moved)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda c: c["text_backbone"].update(name_or_path=5),
            "text_backbone.name_or_path must be a string, got 5",
        ),
        (lambda c: c.update(vision_backbone="bb/vision"), "vision_backbone must be an object"),
        (
            lambda c: c["text_backbone"].update(revision=3),
            "text_backbone.revision must be a string or null, got 3",
        ),
        (
            lambda c: c["text_backbone"].update(fingerprint="abc"),
            "text_backbone.fingerprint must be an object",
        ),
        (lambda c: c.update(backbone_quantization=[1]), "backbone_quantization must be an object"),
        (
            lambda c: c.update(backbone_quantization={"text_config": "4bit"}),
            "backbone_quantization.text_config must",
        ),
        (lambda c: c.update(peft_adapters=["x"]), "peft_adapters must be an object"),
        (
            lambda c: c.update(peft_adapters={"default": {"config": 5}}),
            "peft_adapters.default must be an object",
        ),
        (
            lambda c: c.update(
                peft_adapters={"default": {"on": "language_model", "config": {}, "order": "1"}}
            ),
            "an integer 'order'",
        ),
    ],
)
def test_a_config_json_whose_records_were_edited_out_of_shape_is_refused_by_field(
    trained, tmp_path, edit, message
):
    """The records a save writes into config.json (each backbone's source and fingerprint, how the backbones were
    quantised, the PEFT layers on top): one edited into another shape failed inside the loader with a Python
    TypeError or AttributeError ("'str' object has no attribute 'get'"), or with revision 3 loaded as if nothing
    were wrong. Now the config refuses it, naming the field, before anything loads."""
    model, _ = trained
    model.save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        LavinForConditionalGeneration.from_pretrained(tmp_path / "ckpt")
    assert "written by save_pretrained" in str(error.value)


def test_backbone_with_other_shapes_is_refused_even_when_ignored(trained, tmp_path):
    model, _ = trained
    model.save_pretrained(tmp_path / "ckpt")
    from conftest import make_tokenizer
    from transformers import AutoModelForCausalLM

    wider = tmp_path / "wider"
    tokenizer = make_tokenizer()
    AutoModelForCausalLM.from_config(
        tiny_text_config(vocab_size=len(tokenizer), hidden_size=48)
    ).save_pretrained(wider)
    tokenizer.save_pretrained(wider)
    with pytest.raises(BackboneMismatchError):
        LavinForConditionalGeneration.from_pretrained(tmp_path / "ckpt", text_model=wider)
    with pytest.raises(ValueError, match="do not fit this model"):
        LavinForConditionalGeneration.from_pretrained(
            tmp_path / "ckpt", text_model=wider, ignore_backbone_mismatch=True
        )


def test_fingerprint_tolerates_dtype(trained, tmp_path):
    model, _ = trained
    model.save_pretrained(tmp_path)
    loaded = LavinForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.language_model.dtype == torch.bfloat16


def test_auto_classes_and_pipeline(trained, tmp_path):
    model, processor = trained
    model.save_pretrained(tmp_path, processor=processor)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), LavinConfig)
    auto_model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert isinstance(auto_model, LavinForConditionalGeneration)
    auto_processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(auto_processor, LavinProcessor)
    assert auto_processor.num_image_tokens == processor.num_image_tokens
    assert auto_processor.chat_template == processor.chat_template

    pipe = pipeline("image-text-to-text", model=str(tmp_path))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image_file(tmp_path)},
                {"type": "text", "text": "what color?"},
            ],
        }
    ]
    result = pipe(
        text=messages, max_new_tokens=5, generate_kwargs={"do_sample": False}, return_full_text=False
    )
    # Same tokens as calling the model directly.
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image_file(tmp_path)], text=prompt)
    direct = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    expected = processor.decode(direct[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert result[0]["generated_text"] == expected


def image_file(folder) -> str:
    from PIL import Image

    path = os.path.join(folder, "test_image.png")
    if not os.path.exists(path):
        Image.fromarray(image(3)).save(path)
    return path


def test_processor_rebuilt_from_backbones_when_not_saved(trained, tmp_path):
    model, processor = trained
    model.save_pretrained(tmp_path)  # no processor given
    rebuilt = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(rebuilt, LavinProcessor) and rebuilt.num_image_tokens == model.config.num_image_tokens
    # The processor's own options apply to a rebuilt processor as to a saved one (they were dropped).
    for loader in (AutoProcessor, LavinProcessor):
        options = loader.from_pretrained(
            tmp_path, max_length=77, overflow="truncate_left", max_image_pixels=5000
        )
        assert (options.max_length, options.overflow, options.max_image_pixels) == (77, "truncate_left", 5000)


def test_a_rebuilt_processor_takes_the_settings_a_saved_one_takes(trained, tmp_path):
    """A folder without processor files gets its processor rebuilt from the backbones: image-processor and tokenizer
    settings given to from_pretrained apply to it as to a saved processor (they were dropped), and the model's
    loading keywords that transformers' pipeline passes to the processor too are ignored by both, as transformers'
    processors ignore them. `padding_side`: the processors pad each call themselves (left for generate); "right" at
    load time is refused with the call keyword to use (it was dropped), "left" (TRL passes it) is accepted."""
    model, processor = trained
    model.save_pretrained(tmp_path / "rebuilt")
    model.save_pretrained(tmp_path / "saved", processor=processor)
    settings = dict(
        size={"height": 48, "width": 48},
        image_mean=[0.25, 0.5, 0.75],
        model_max_length=33,
        truncation_side="left",
        dtype=torch.bfloat16,
        attn_implementation="eager",
        trust_remote_code=True,
        local_files_only=True,
    )
    image = np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)
    pixel_values = []
    for loader in (AutoProcessor, LavinProcessor):
        for folder in ("saved", "rebuilt"):
            loaded = loader.from_pretrained(tmp_path / folder, **settings)
            assert (loaded.tokenizer.model_max_length, loaded.tokenizer.truncation_side) == (33, "left"), (
                folder
            )
            pixel_values.append(loaded(images=[image], text="Image: <image>\nwhat?")["pixel_values"])
            with pytest.raises(ValueError, match=r"padding_side='right'.*processor\(\.\.\., padding_side="):
                loader.from_pretrained(tmp_path / folder, padding_side="right")
            assert (
                loader.from_pretrained(tmp_path / folder, padding_side="left").tokenizer.padding_side
                == "left"
            )
    assert pixel_values[0].shape == (1, 3, 48, 48)
    for other in pixel_values[1:]:
        torch.testing.assert_close(other, pixel_values[0])


def test_a_rebuilt_processor_takes_the_backbones_where_they_are_now(tiny_backbones, tmp_path):
    """A checkpoint without processor files whose backbone folders moved: the processor's from_pretrained takes
    `text_model=` / `vision_model=` as the model's does (and `mmadapters eval` / `chat` pass them on), and without
    them names the missing folder and the keyword (it was "Repo id must be in the form 'repo_name'", from inside
    huggingface_hub). A saved processor reads no backbone: the keywords change nothing there."""
    import shutil

    from mmadapters.inference_loading import load_for_inference
    from mmadapters.modeling.backbones import BackboneNotFoundError

    llm, vision = (
        shutil.copytree(tiny_backbones[0], tmp_path / "llm"),
        shutil.copytree(tiny_backbones[1], tmp_path / "vision"),
    )
    model = LavinForConditionalGeneration.from_backbones(str(llm), str(vision))
    model.save_pretrained(tmp_path / "rebuilt")
    model.save_pretrained(tmp_path / "saved", processor=LavinProcessor.from_backbones(str(llm), str(vision)))
    expected = tiny_sample_inputs(LavinProcessor.from_backbones(*tiny_backbones))
    moved = {"text_model": str(tmp_path / "llm-moved"), "vision_model": str(tmp_path / "vision-moved")}
    shutil.move(llm, moved["text_model"])
    shutil.move(vision, moved["vision_model"])
    for loader in (AutoProcessor, LavinProcessor):
        with pytest.raises(
            BackboneNotFoundError, match=r"text backbone folder .*llm does not exist.*text_model="
        ):
            loader.from_pretrained(tmp_path / "rebuilt")
        for folder in ("rebuilt", "saved"):
            got = tiny_sample_inputs(loader.from_pretrained(tmp_path / folder, **moved))
            assert all(torch.equal(got[key], expected[key]) for key in expected), folder
    _, processor = load_for_inference(str(tmp_path / "rebuilt"), **moved)
    got = tiny_sample_inputs(processor)
    assert all(torch.equal(got[key], expected[key]) for key in expected)


def test_a_processor_that_does_not_fit_the_model_is_refused_before_anything_is_written(
    trained, tiny_backbones, tmp_path
):
    """`save_pretrained(processor=...)` (and so `push_to_hub` and the Trainers' checkpoints) saved any processor
    with the model: the other method's, a bare tokenizer, one expanding `<image>` to another number of visual tokens,
    or one built on another LLM's tokenizer (the image placeholder gets another id). Each loaded back as the
    checkpoint's processor and built inputs the model refused, or, for a tokenizer, no processor at all. Refused
    now, before anything is written, and when a Trainer is given one (as processing_class or in its collator)."""
    from conftest import make_tokenizer, make_trainer, toy_dataset

    from mmadapters import CromeProcessor
    from mmadapters.modeling.image_tokens import NumImageTokensError
    from mmadapters.trainers import VisionLanguageCollator

    model, processor = trained
    other_tokenizer = make_tokenizer()
    other_tokenizer.add_tokens(["<extra>"])
    other_llm = save_tiny_llm(tmp_path / "other-llm", tokenizer=other_tokenizer)
    count = model.config.num_image_tokens
    cases = [
        (
            CromeProcessor.from_backbones(*tiny_backbones),
            ValueError,
            r"CromeProcessor is not a processor of LaVIN",
        ),
        (processor.tokenizer, ValueError, r"is not a processor of LaVIN.*LavinProcessor.from_model\(model\)"),
        (
            LavinProcessor.from_backbones(*tiny_backbones, num_image_tokens=count + 1),
            NumImageTokensError,
            f"expands each <image> to {count + 1} visual tokens, but this model makes {count}",
        ),
        (
            LavinProcessor.from_backbones(other_llm, tiny_backbones[1]),
            ValueError,
            r"gives the image placeholder id 301, but this model's is 300: it was built for another LLM",
        ),
    ]
    (tmp_path / "data").mkdir()
    for bad, error, message in cases:
        with pytest.raises(error, match=message):
            model.save_pretrained(tmp_path / "out", processor=bad)
        assert not (tmp_path / "out").exists()
        dataset = toy_dataset(tmp_path / "data", n=4)
        with pytest.raises(error, match=message):
            make_trainer(model, processor, dataset, tmp_path / "run", processing_class=bad)
        if isinstance(bad, LavinProcessor):  # a LaVIN processor of another count or LLM, in the collator
            with pytest.raises(error, match=message):
                make_trainer(
                    model, processor, dataset, tmp_path / "run", data_collator=VisionLanguageCollator(bad)
                )
    model.save_pretrained(tmp_path / "out", processor=processor)
    assert isinstance(AutoProcessor.from_pretrained(tmp_path / "out"), LavinProcessor)


def test_a_checkpoint_without_processor_files_or_backbone_names_is_named(tmp_path):
    """A model built from config objects names no backbone to rebuild its processor from (was transformers' error
    about a tokenizer it could not find)."""
    from conftest import tiny_model_from_configs

    tiny_model_from_configs("lavin").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds no processor files.*names no backbone.*processor=processor"):
        LavinProcessor.from_pretrained(tmp_path)


def test_a_processor_for_another_number_of_visual_tokens_is_refused_clearly(trained, tmp_path):
    """num_image_tokens is the model's: a processor that expands `<image>` otherwise builds inputs the model refuses.
    It raised "property 'num_image_tokens' of 'LavinConfig' object has no setter" from inside transformers."""
    from mmadapters.modeling.image_tokens import NumImageTokensError

    model, processor = trained
    model.save_pretrained(tmp_path / "saved", processor=processor)
    model.save_pretrained(tmp_path / "rebuilt")
    recorded = model.config.num_image_tokens
    for folder in ("saved", "rebuilt"):
        for loader in (AutoProcessor, LavinProcessor):
            with pytest.raises(NumImageTokensError, match=f"makes {recorded} visual tokens per image"):
                loader.from_pretrained(tmp_path / folder, num_image_tokens=recorded + 1)
            assert (
                loader.from_pretrained(tmp_path / folder, num_image_tokens=recorded).num_image_tokens
                == recorded
            )


def test_a_checkpoint_saved_by_mmadapters_0_1_loads_identically(tmp_path, monkeypatch):
    # tests/fixtures/mmadapters-0.1: saved by the 0.1.0 code (adapter_model.safetensors + adapter_config.json,
    # backbones named by relative paths), with the logits it computed (make_fixture.py there).
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoProcessor

    from mmadapters.checkpoint_files import ADAPTER_WEIGHTS_NAME, LEGACY_ADAPTER_WEIGHTS_NAME

    folder = tmp_path / "mmadapters-0.1"
    shutil.copytree(os.path.join(os.path.dirname(__file__), "fixtures", "mmadapters-0.1"), folder)
    monkeypatch.chdir(folder)  # the 0.1 checkpoint names its backbones "llm" and "vision"
    assert sorted(os.listdir("lavin"))[:2] == ["adapter_config.json", LEGACY_ADAPTER_WEIGHTS_NAME]
    expected = load_file("expected_lavin.safetensors")
    inputs = {key.removeprefix("lavin_"): value for key, value in expected.items() if key != "lavin_logits"}
    model = LavinForConditionalGeneration.from_pretrained("lavin").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected["lavin_logits"], rtol=0, atol=1e-5)
    processor = AutoProcessor.from_pretrained("lavin")
    again_inputs = tiny_sample_inputs(processor)  # the same image and prompts as the 0.1 processor was given
    for key, value in inputs.items():
        torch.testing.assert_close(again_inputs[key], value, rtol=0, atol=1e-6)
    # Saved again by this version: today's file names, the same model.
    model.save_pretrained("lavin", processor=processor)
    assert os.path.isfile(os.path.join("lavin", ADAPTER_WEIGHTS_NAME))
    assert not os.path.exists(os.path.join("lavin", LEGACY_ADAPTER_WEIGHTS_NAME))
    again = LavinForConditionalGeneration.from_pretrained("lavin").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, expected["lavin_logits"], rtol=0, atol=1e-5)
