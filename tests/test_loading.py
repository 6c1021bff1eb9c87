"""The native loading contract: every `from_pretrained` keyword honoured (its effect visible on the loaded
modules) or refused with a message; loaded backbones; device maps; quantised backbones (LaVIN-lite)."""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os
import re
import shutil

import pytest
import torch
from conftest import (
    make_trainer,
    save_llm_with_width,
    save_tiny_llm,
    tiny_qformer_config,
    tiny_text_config,
    tiny_vision_config,
    toy_dataset,
)
from transformers import AutoModelForCausalLM, CLIPVisionModel

from mmadapters import (
    BackboneWeightsMissingError,
    CromeForConditionalGeneration,
    LavinConfig,
    LavinForConditionalGeneration,
    LavinProcessor,
)
from mmadapters.modeling.loading import LoadingOptionError


def image(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8).numpy()


@pytest.fixture()
def checkpoint(tiny_backbones, tmp_path, randomize_adapters):
    """An adapter-only LaVIN checkpoint with non-trivial adapters, and the model it was saved from."""
    torch.manual_seed(0)
    model = randomize_adapters(LavinForConditionalGeneration.from_backbones(*tiny_backbones)).eval()
    model.save_pretrained(tmp_path / "ckpt")
    return str(tmp_path / "ckpt"), model


@pytest.fixture()
def inputs(tiny_backbones):
    processor = LavinProcessor.from_backbones(*tiny_backbones)
    return processor(
        images=[[image(0)], []], text=["Image: <image>\nwhat color is it?", "Image: N/A\nthe capital of"]
    )


def attn(model):
    return model.language_model.config._attn_implementation, model.vision_tower.config._attn_implementation


# ---------------------------------------------------------------------------------------------------------------
# Keywords honoured or refused
# ---------------------------------------------------------------------------------------------------------------


def test_unknown_keywords_raise_type_error(tiny_backbones, checkpoint, tmp_path):
    with pytest.raises(TypeError, match="made_up"):
        LavinForConditionalGeneration.from_backbones(*tiny_backbones, made_up=1)
    with pytest.raises(TypeError, match="made_up"):
        LavinForConditionalGeneration.from_pretrained(checkpoint[0], made_up=1)
    # A full checkpoint: transformers' loader hands the keywords it does not know to the model's __init__, which
    # named our base class ("FrozenBackbonesPreTrainedModel.__init__() got an unexpected keyword argument").
    LavinForConditionalGeneration.from_backbones(*tiny_backbones).save_pretrained(
        tmp_path / "full", adapter_only=False
    )
    with pytest.raises(
        TypeError,
        match=r"LavinForConditionalGeneration got unexpected keyword argument\(s\) \['made_up'\]: they are neither "
        "loading options nor fields of LavinConfig",
    ):
        LavinForConditionalGeneration.from_pretrained(tmp_path / "full", made_up=1)


def test_misspelt_keywords_are_answered_with_the_closest_known_name(tiny_backbones, checkpoint, tmp_path):
    """A misspelt loading keyword or config field gets the name it is close to; a field of the adapter config
    given as a keyword is shown how to pass it (adapter_config=)."""
    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    model.save_pretrained(tmp_path / "full", adapter_only=False)
    loaders = {
        "from_backbones()": lambda **kw: LavinForConditionalGeneration.from_backbones(*tiny_backbones, **kw),
        "from_pretrained()": lambda **kw: LavinForConditionalGeneration.from_pretrained(checkpoint[0], **kw),
        "LavinForConditionalGeneration": lambda **kw: LavinForConditionalGeneration.from_pretrained(
            tmp_path / "full", **kw
        ),
    }
    for where, load in loaders.items():
        with pytest.raises(
            TypeError, match=rf"{re.escape(where)} got .*\(did you mean 'device_map' for 'device_mapp'\?\)"
        ):
            load(device_mapp="auto")
        with pytest.raises(
            TypeError, match=r"did you mean 'vision_feature_layers' for 'vision_feature_layer'\?"
        ):
            load(vision_feature_layer=[-2])
        with pytest.raises(TypeError, match="did you mean") as caught:
            load(attn_implmentation="sdpa", dtyp="bfloat16")
        assert "'attn_implementation' for 'attn_implmentation'" in str(caught.value)
        assert "'dtype' for 'dtyp'" in str(caught.value)
        with pytest.raises(TypeError) as caught:
            load(r=4)
        assert "['r']: fields of MMAdapterConfig: pass adapter_config={'r': ...}." in str(caught.value)
        assert "did you mean" not in str(caught.value)
    with pytest.raises(TypeError, match="did you mean 'safe_serialization' for 'safe_serialisation'"):
        model.save_pretrained(tmp_path / "adapters", safe_serialisation=True)
    assert not (tmp_path / "adapters").exists()


@pytest.mark.parametrize("keyword", ["gguf_file", "tp_plan", "key_mapping", "use_kernels"])
def test_unsupported_keywords_are_refused_with_the_reason(tiny_backbones, checkpoint, keyword):
    with pytest.raises(LoadingOptionError, match=f"does not support `{keyword}`"):
        LavinForConditionalGeneration.from_backbones(*tiny_backbones, **{keyword: "x"})
    with pytest.raises(LoadingOptionError, match=f"does not support `{keyword}`"):
        LavinForConditionalGeneration.from_pretrained(checkpoint[0], **{keyword: "x"})


def test_every_keyword_of_transformers_from_pretrained_is_honoured_or_refused():
    """Each keyword that the installed transformers' `PreTrainedModel.from_pretrained` reads has its place in
    loading.py, so a new one is not met with "unexpected keyword argument". transformers 5.25 added
    `kernels_mode`."""
    from transformers import PreTrainedModel

    from mmadapters.modeling import loading

    read = set(re.findall(r'kwargs\.pop\(\s*"(\w+)"', inspect.getsource(PreTrainedModel.from_pretrained)))
    parameters = inspect.signature(PreTrainedModel.from_pretrained).parameters
    read |= {name for name, p in parameters.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    # Every keyword the "did you mean" of an unknown one compares with (PASS_THROUGH, NO_EFFECT, REFUSED, the ones
    # read into BackboneLoadOptions), and transformers' internal ones.
    placed = loading.loading_keyword_names() | set(loading.INTERNAL)
    # Read by our from_pretrained itself.
    placed |= {"pretrained_model_name_or_path", "config", "revision", "generation_config"}
    assert read - placed == set()
    # The names listed as read by take_loading_options are the ones it takes (the list is written beside the code).
    taken = {name: None for name in loading.TAKEN}
    loading.take_loading_options(taken, "from_pretrained")
    assert taken == {}


def test_weight_loading_keywords_reach_both_backbones(tiny_backbones, checkpoint, monkeypatch):
    """`from_pretrained` keywords about reading weights go to each backbone's own `from_pretrained`, from
    `from_backbones` and from an adapter-only checkpoint. `tqdm_class` (the download progress bars) was refused as
    an unknown keyword."""
    from tqdm.auto import tqdm
    from transformers import PreTrainedModel

    received = []
    original = PreTrainedModel.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        received.append((cls.__name__, {k: kwargs.get(k) for k in keywords}))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(recording))
    keywords = {"tqdm_class": tqdm, "use_safetensors": True, "weights_only": True, "disable_mmap": True}
    for load in (
        lambda: LavinForConditionalGeneration.from_backbones(*tiny_backbones, **keywords),
        lambda: LavinForConditionalGeneration.from_pretrained(checkpoint[0], **keywords),
    ):
        received.clear()
        load()
        backbones = [(name, got) for name, got in received if name in ("LlamaForCausalLM", "CLIPVisionModel")]
        assert [name for name, _ in backbones] == ["LlamaForCausalLM", "CLIPVisionModel"]
        assert all(got == keywords for _, got in backbones), backbones


def test_backbones_load_without_hub_kernels_unless_a_full_checkpoint_asks(
    tiny_backbones, checkpoint, tmp_path, monkeypatch
):
    """transformers 5.25 turns Hub kernels on when `use_kernels` is not given (earlier releases had them off): every
    backbone load and every full-checkpoint load says `use_kernels=False`, so the layers our adapters hook into
    stay transformers' own and nothing is fetched from the Hub while loading."""
    from transformers import PreTrainedModel

    received = []
    original = PreTrainedModel.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        received.append((cls.__name__, kwargs.get("use_kernels", "not given")))
        if kwargs.get("use_kernels"):
            raise RuntimeError("kernels asked")
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(recording))
    LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    LavinForConditionalGeneration.from_pretrained(checkpoint[0])
    full = tmp_path / "full"
    checkpoint[1].save_pretrained(full, adapter_only=False)
    LavinForConditionalGeneration.from_pretrained(full)
    assert received and all(use_kernels is False for _, use_kernels in received), received
    assert {name for name, _ in received} >= {
        "LlamaForCausalLM",
        "CLIPVisionModel",
        "LavinForConditionalGeneration",
    }
    # A full checkpoint loads with transformers' own loader: asking for kernels there reaches it.
    with pytest.raises(RuntimeError, match="kernels asked"):
        LavinForConditionalGeneration.from_pretrained(full, use_kernels=True)


def test_output_loading_info_reports_the_backbones_loading_under_their_names_in_the_model(
    tiny_backbones, tmp_path, inputs
):
    """transformers' `(model, loading_info)`: for an adapter-only checkpoint, what each backbone's own loading found
    (our adapter file is loaded strictly: a missing or extra tensor is an error, never a report). It was refused."""
    from safetensors.torch import load_file, save_file

    llm_folder = tmp_path / "llm"
    shutil.copytree(tiny_backbones[0], llm_folder)
    model = LavinForConditionalGeneration.from_backbones(llm_folder, tiny_backbones[1])
    model.save_pretrained(tmp_path / "adapters")
    model.save_pretrained(tmp_path / "full", adapter_only=False)
    empty = {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    for folder in ("adapters", "full"):
        loaded, info = LavinForConditionalGeneration.from_pretrained(
            tmp_path / folder, output_loading_info=True
        )
        assert isinstance(loaded, LavinForConditionalGeneration) and info == empty, folder
    assert LavinForConditionalGeneration.from_pretrained(
        tmp_path / "adapters", output_loading_info=False
    ).config

    weights = load_file(llm_folder / "model.safetensors")  # the LLM's folder gains a tensor it does not use
    weights["model.extra.weight"] = torch.zeros(2)
    save_file(weights, llm_folder / "model.safetensors", metadata={"format": "pt"})
    loaded, info = LavinForConditionalGeneration.from_pretrained(
        tmp_path / "adapters", output_loading_info=True, ignore_backbone_mismatch=True
    )
    assert info == {**empty, "unexpected_keys": {"language_model.model.extra.weight"}}
    del weights["model.norm.weight"]  # and loses its final norm: refused, not reported (it would stay random)
    save_file(weights, llm_folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BackboneWeightsMissingError, match="model.norm.weight would be random"):
        LavinForConditionalGeneration.from_pretrained(
            tmp_path / "adapters", output_loading_info=True, ignore_backbone_mismatch=True
        )
    with pytest.raises(LoadingOptionError, match="from_backbones does not take `output_loading_info`"):
        LavinForConditionalGeneration.from_backbones(*tiny_backbones, output_loading_info=True)


def test_subfolder_is_where_the_checkpoint_lies(tiny_backbones, checkpoint, tmp_path, inputs):
    """`subfolder` (transformers' meaning: the checkpoint's folder inside the path or repo, e.g. a Trainer push's
    last-checkpoint/) is honoured by from_pretrained; from_backbones refuses it (it would be ambiguous there)."""
    import shutil

    folder, model = checkpoint
    shutil.copytree(folder, tmp_path / "run" / "last-checkpoint")
    loaded = LavinForConditionalGeneration.from_pretrained(tmp_path / "run", subfolder="last-checkpoint")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="no subfolder 'checkpoint-9'"):
        LavinForConditionalGeneration.from_pretrained(tmp_path / "run", subfolder="checkpoint-9")
    with pytest.raises(LoadingOptionError, match="does not support `subfolder`"):
        LavinForConditionalGeneration.from_backbones(*tiny_backbones, subfolder="x")


def test_adapter_config_overrides_settings_that_leave_the_weights_alone(checkpoint, tmp_path, inputs):
    """`from_pretrained(checkpoint, adapter_config=...)`, as transformers takes config fields: the fields given
    replace the checkpoint's (a dict of some fields, or a whole adapter config); fields that decide the adapters'
    weights (their shapes, which exist) must keep the checkpoint's values, refused before anything loads."""
    from mmadapters import MMAdapterConfig
    from mmadapters.modeling.adapters import AdapterSettingsError

    folder, saved = checkpoint
    expected = saved.config.adapter_config
    hotter = LavinForConditionalGeneration.from_pretrained(
        folder, adapter_config={"temperature": 2.5, "dropout": 0}
    )
    assert hotter.config.adapter_config == {**expected, "temperature": 2.5, "dropout": 0}
    assert hotter.llm_adapters[0].attn.temperature == 2.5  # the modules read it
    for name, tensor in saved.adapter_state_dict().items():
        assert torch.equal(hotter.adapter_state_dict()[name], tensor)
    with torch.no_grad():
        assert not torch.allclose(hotter(**inputs).logits, saved(**inputs).logits)

    whole = MMAdapterConfig.from_dict({**expected, "scale": 0.5})
    assert (
        LavinForConditionalGeneration.from_pretrained(folder, adapter_config=whole).config.adapter_config[
            "scale"
        ]
        == 0.5
    )
    with pytest.raises(AdapterSettingsError, match=r"r \(8 -> 4\).*placement \('attn' -> 'attn_mlp'\)"):
        LavinForConditionalGeneration.from_pretrained(
            folder, adapter_config={"r": 4, "placement": "attn_mlp"}
        )
    with pytest.raises(ValueError, match="Unknown MMAdapterConfig field"):
        LavinForConditionalGeneration.from_pretrained(folder, adapter_config={"bottleneck": 4})
    with pytest.raises(TypeError, match="adapter_config must be"):
        LavinForConditionalGeneration.from_pretrained(folder, adapter_config=4)

    # The Auto classes read the config first (AutoConfig with the keywords): the same there.
    from transformers import AutoConfig, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText.from_pretrained(
        folder, adapter_config={"temperature": 2.5, "dropout": 0}
    )
    assert auto.config.adapter_config == hotter.config.adapter_config
    assert (
        AutoConfig.from_pretrained(folder, adapter_config={"scale": 0.5}).adapter_config["r"] == expected["r"]
    )
    with pytest.raises(AdapterSettingsError, match=r"r \(8 -> 4\)"):
        AutoModelForImageTextToText.from_pretrained(folder, adapter_config={"r": 4})

    # A full checkpoint takes it the same way.
    saved.save_pretrained(tmp_path / "full", adapter_only=False)
    full = LavinForConditionalGeneration.from_pretrained(
        tmp_path / "full", adapter_config={"temperature": 2.5}
    )
    assert full.config.adapter_config["temperature"] == 2.5 and full.llm_adapters[0].attn.temperature == 2.5
    with torch.no_grad():
        assert torch.allclose(full(**inputs).logits, hotter.eval()(**inputs).logits, atol=1e-5)
    with pytest.raises(AdapterSettingsError, match=r"groups \(2 -> 4\)"):
        LavinForConditionalGeneration.from_pretrained(tmp_path / "full", adapter_config={"groups": 4})


def test_config_field_keywords_apply_to_every_kind_of_checkpoint(checkpoint, tmp_path):
    """transformers sets a keyword that is a config attribute (`output_hidden_states=True`) on the config it loads.
    A full checkpoint loaded with `adapter_config=` (or pre-quantised, below) raised TypeError for it: the
    config object we hand transformers' loader went without it, so transformers passed it to __init__."""
    folder, saved = checkpoint
    saved.save_pretrained(tmp_path / "full", adapter_only=False)
    for source, options in (
        (folder, {}),
        (folder, {"adapter_config": {"temperature": 2.5}}),
        (tmp_path / "full", {}),
        (tmp_path / "full", {"adapter_config": {"temperature": 2.5}}),
    ):
        model = LavinForConditionalGeneration.from_pretrained(source, output_hidden_states=True, **options)
        assert model.config.output_hidden_states is True, (source, options)
        assert model.config.adapter_config["temperature"] == options.get("adapter_config", {}).get(
            "temperature", 10
        )


def test_attn_implementation_applies_to_both_backbones(tiny_backbones, checkpoint, inputs):
    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones, attn_implementation="eager")
    assert attn(model) == ("eager", "eager")
    loaded = LavinForConditionalGeneration.from_pretrained(checkpoint[0], attn_implementation="eager")
    assert attn(loaded) == ("eager", "eager")
    with torch.no_grad():  # eager and sdpa compute the same model (padding positions aside)
        real = inputs["attention_mask"].bool()
        eager, sdpa = loaded(**inputs).logits[real], checkpoint[1](**inputs).logits[real]
        torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=0)
    # transformers' per-sub-config dict form
    mixed = LavinForConditionalGeneration.from_pretrained(
        checkpoint[0], attn_implementation={"text_config": "eager"}
    )
    assert attn(mixed) == ("eager", "sdpa")
    assert (
        mixed.config._attn_implementation == "eager"
        or mixed.config.text_config._attn_implementation == "eager"
    )


def test_attention_asked_through_a_config_object_is_honoured(checkpoint):
    """transformers' pipeline passes `model_kwargs={"attn_implementation": ...}` as a config it loaded with it
    (`config=`, no keyword); the backbones were loaded with their default attention instead."""
    from transformers import AutoConfig, pipeline

    config = AutoConfig.from_pretrained(checkpoint[0], attn_implementation={"text_config": "eager"})
    assert attn(LavinForConditionalGeneration.from_pretrained(checkpoint[0], config=config)) == (
        "eager",
        "sdpa",
    )
    # A keyword still decides over the config.
    chosen = LavinForConditionalGeneration.from_pretrained(
        checkpoint[0], config=config, attn_implementation="sdpa"
    )
    assert attn(chosen) == ("sdpa", "sdpa")
    pipe = pipeline("image-text-to-text", model=checkpoint[0], model_kwargs={"attn_implementation": "eager"})
    assert attn(pipe.model) == ("eager", "eager")


def test_a_mixture_of_experts_llm_keeps_its_experts_implementation(tiny_backbones, tmp_path):
    """Building the composite config from the backbones' configs reset the LLM's experts implementation to None
    (transformers then warned and fell back to its slow path): every way in keeps what transformers chose."""
    folder = save_tiny_llm(tmp_path / "moe", kind="mixtral")
    expected = AutoModelForCausalLM.from_pretrained(folder).config._experts_implementation
    assert expected is not None
    built = [
        LavinForConditionalGeneration.from_backbones(folder, tiny_backbones[1]),
        LavinForConditionalGeneration.from_backbones(
            AutoModelForCausalLM.from_pretrained(folder), tiny_backbones[1]
        ),
        CromeForConditionalGeneration.from_backbones(
            folder, tiny_backbones[1], qformer=tiny_qformer_config(), num_query_tokens=4
        ),
    ]
    built[0].save_pretrained(tmp_path / "adapters")
    built[0].save_pretrained(tmp_path / "full", adapter_only=False)
    built.append(LavinForConditionalGeneration.from_pretrained(tmp_path / "adapters"))
    built.append(LavinForConditionalGeneration.from_pretrained(tmp_path / "full"))
    for model in built:
        assert model.language_model.config._experts_implementation == expected
        assert model.config.text_config._experts_implementation == expected
    # experts_implementation is honoured like attn_implementation: for both backbones, or per sub-config.
    other = "eager" if expected != "eager" else "batched_mm"
    asked = [
        LavinForConditionalGeneration.from_backbones(folder, tiny_backbones[1], experts_implementation=other),
        LavinForConditionalGeneration.from_backbones(
            AutoModelForCausalLM.from_pretrained(folder), tiny_backbones[1], experts_implementation=other
        ),
        LavinForConditionalGeneration.from_pretrained(
            tmp_path / "adapters", experts_implementation={"text_config": other}
        ),
        LavinForConditionalGeneration.from_pretrained(tmp_path / "full", experts_implementation=other),
    ]
    for model in asked:
        assert model.language_model.config._experts_implementation == other
    with torch.no_grad():
        ids = torch.tensor([[5, 6, 7, 8]])
        torch.testing.assert_close(asked[2](input_ids=ids).logits, built[3](input_ids=ids).logits)
    with pytest.raises(ValueError, match="nonsense"):
        LavinForConditionalGeneration.from_backbones(
            folder, tiny_backbones[1], experts_implementation="nonsense"
        )


def test_attn_implementation_is_validated(tiny_backbones):
    with pytest.raises(ValueError, match="nonsense"):
        LavinForConditionalGeneration.from_backbones(*tiny_backbones, attn_implementation="nonsense")
    with pytest.raises(LoadingOptionError, match="keyed by 'text_config'"):
        LavinForConditionalGeneration.from_backbones(*tiny_backbones, attn_implementation={"llm": "eager"})


def test_dtype_and_torch_dtype(tiny_backbones, checkpoint, tmp_path):
    loaded = LavinForConditionalGeneration.from_pretrained(checkpoint[0], dtype=torch.bfloat16)
    assert loaded.language_model.dtype == loaded.vision_tower.dtype == torch.bfloat16
    assert loaded.projector.linear_1.weight.dtype == torch.float32  # adapters stay float32
    # A full checkpoint: transformers' loader, with torch_dtype honoured (not overridden by our float32 default).
    full = tmp_path / "full"
    checkpoint[1].save_pretrained(full, adapter_only=False)
    half = LavinForConditionalGeneration.from_pretrained(full, torch_dtype=torch.float16)
    assert half.language_model.dtype == torch.float16
    assert LavinForConditionalGeneration.from_pretrained(full).language_model.dtype == torch.float32


@pytest.mark.parametrize("model_class", [LavinForConditionalGeneration, CromeForConditionalGeneration])
def test_every_way_of_loading_trains_the_same_parameters(tiny_backbones, tmp_path, model_class):
    """A full checkpoint loaded with every parameter trainable (transformers' loader makes what it loads
    trainable): a training loop over the `requires_grad` parameters trained the frozen LLM and vision tower, and
    CROME's modules of every stage at once. Now both checkpoint kinds train what the saved model trained: our
    modules (CROME: the last stage's) and the LoRA on top."""
    from peft import LoraConfig

    from mmadapters import add_lora

    model = model_class.from_backbones(*tiny_backbones)
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    if model_class is CromeForConditionalGeneration:
        model.set_stage("instruct")
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in name for name in expected)
    assert not any(
        name.startswith(("language_model", "vision_tower")) and "lora_" not in name for name in expected
    )
    model.save_pretrained(tmp_path / "adapters")
    model.save_pretrained(tmp_path / "full", adapter_only=False)
    for kind in ("adapters", "full"):
        loaded = model_class.from_pretrained(tmp_path / kind)
        assert {name for name, p in loaded.named_parameters() if p.requires_grad} == expected, kind


@pytest.mark.parametrize("model_class", [LavinForConditionalGeneration, CromeForConditionalGeneration])
def test_both_checkpoint_kinds_reload_in_the_asked_or_saved_dtype_with_our_modules_in_float32(
    tiny_backbones, tmp_path, model_class
):
    """`dtype="auto"` is the dtype the model was saved in (transformers' meaning), for an adapter-only checkpoint as
    for a full one; our modules are float32 either way, loaded exactly. Before: the full checkpoint's loader built
    our modules in the backbones' dtype (saved float32 weights rounded to bfloat16, then trained in it), a CROME
    model reported the dtype of its float32 query tokens (so its full checkpoint recorded float32), and "auto" of
    an adapter-only checkpoint took each backbone source's own dtype. `config.dtype` is the dtype the weights are
    in, as transformers' from_pretrained and save record it (it was None for our models, and null in config.json)."""
    torch.manual_seed(0)
    model = model_class.from_backbones(*tiny_backbones, dtype=torch.bfloat16)
    assert model.dtype == model.language_model.dtype == model.config.dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "adapters")
    model.save_pretrained(tmp_path / "full", adapter_only=False)
    for folder in ("adapters", "full"):
        assert json.loads((tmp_path / folder / "config.json").read_text())["dtype"] == "bfloat16", folder
    own = {
        name: parameter
        for name, parameter in model.named_parameters()
        if not name.startswith(("language_model.", "vision_tower."))
    }
    for folder in ("adapters", "full"):
        for dtype, expected in (
            ("auto", torch.bfloat16),
            (None, torch.float32),
            (torch.float16, torch.float16),
        ):
            loaded = model_class.from_pretrained(
                tmp_path / folder, **({} if dtype is None else {"dtype": dtype})
            )
            assert loaded.dtype == loaded.language_model.dtype == loaded.vision_tower.dtype == expected, (
                folder,
                dtype,
            )
            assert loaded.config.dtype == expected, (folder, dtype)
            loaded_own = dict(loaded.named_parameters())
            for name, parameter in own.items():
                assert loaded_own[name].dtype == torch.float32, (folder, dtype, name)
                assert torch.equal(loaded_own[name], parameter), (folder, dtype, name)


def test_a_dtype_per_backbone_is_honoured_where_each_backbone_loads_by_itself(
    tiny_backbones, tmp_path, inputs
):
    """transformers' dict form of `dtype` (documented in mmadapters.modeling.loading) reached each backbone as a
    dict, which it read as float32. A full checkpoint loads in one dtype (transformers would turn the dict into
    float32 for everything, with a deprecation warning): a dict asking two is refused there."""
    per_backbone = {"text_config": torch.bfloat16, "vision_config": torch.float16}
    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones, dtype=per_backbone)
    assert (model.language_model.dtype, model.vision_tower.dtype) == (torch.bfloat16, torch.float16)
    with torch.no_grad():
        assert model(**inputs).logits.dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "adapters")
    model.save_pretrained(tmp_path / "full", adapter_only=False)
    for dtype, expected in (
        (per_backbone, (torch.bfloat16, torch.float16)),
        ("auto", (torch.bfloat16, torch.float16)),
        ({"vision_config": torch.bfloat16}, (torch.float32, torch.bfloat16)),
    ):
        loaded = LavinForConditionalGeneration.from_pretrained(tmp_path / "adapters", dtype=dtype)
        assert (loaded.language_model.dtype, loaded.vision_tower.dtype) == expected, dtype
    with pytest.raises(LoadingOptionError, match="full checkpoint, which loads in one dtype"):
        LavinForConditionalGeneration.from_pretrained(tmp_path / "full", dtype=per_backbone)
    both = {"text_config": torch.bfloat16, "vision_config": torch.bfloat16}
    loaded = LavinForConditionalGeneration.from_pretrained(tmp_path / "full", dtype=both)
    assert loaded.language_model.dtype == loaded.vision_tower.dtype == torch.bfloat16
    with pytest.raises(LoadingOptionError, match="keyed by 'text_config' and/or 'vision_config'"):
        LavinForConditionalGeneration.from_backbones(*tiny_backbones, dtype={"text": torch.bfloat16})


def test_crome_backbones_follow_dtype_in_full_checkpoints(tmp_path):
    from conftest import tiny_qformer_config

    model = CromeForConditionalGeneration.from_backbones(
        tiny_text_config(), tiny_vision_config(), qformer=tiny_qformer_config(vocab_size=300)
    )
    model.save_pretrained(tmp_path)  # config-built backbones: every weight is saved
    loaded = CromeForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float16)
    assert loaded.language_model.dtype == loaded.vision_tower.dtype == torch.float16


def test_hub_keywords_reach_the_backbones(checkpoint):
    # local_files_only / cache_dir / token are accepted and passed on (a local checkpoint loads as before).
    loaded = LavinForConditionalGeneration.from_pretrained(
        checkpoint[0], local_files_only=True, token=None, cache_dir=None, low_cpu_mem_usage=True
    )
    assert isinstance(loaded, LavinForConditionalGeneration)


# ---------------------------------------------------------------------------------------------------------------
# Device maps
# ---------------------------------------------------------------------------------------------------------------


def test_device_map_single_device_and_bad_values(checkpoint):
    loaded = LavinForConditionalGeneration.from_pretrained(checkpoint[0], device_map="cpu")
    assert set(loaded.hf_device_map.values()) == {"cpu"}
    with pytest.raises(LoadingOptionError, match="not a device"):
        LavinForConditionalGeneration.from_pretrained(checkpoint[0], device_map="nonsense")
    with pytest.raises(LoadingOptionError, match="does not have"):
        LavinForConditionalGeneration.from_pretrained(checkpoint[0], device_map={"llm": "cpu"})


def test_device_map_dict_places_modules_as_asked(checkpoint):
    device_map = {
        "language_model": "cpu",
        "vision_tower": "meta",
        "llm_adapters": "cpu",
        "vision_adapters": "cpu",
        "projector": "cpu",
        "modality_embedding": "cpu",
    }
    loaded = LavinForConditionalGeneration.from_pretrained(checkpoint[0], device_map=device_map)
    assert loaded.vision_tower.device.type == "meta"
    assert loaded.language_model.device.type == "cpu"
    assert loaded.hf_device_map["vision_tower"] == "meta"
    with pytest.raises(LoadingOptionError, match="does not place every weight"):
        LavinForConditionalGeneration.from_pretrained(checkpoint[0], device_map={"language_model": "cpu"})
    # Everything on the meta device (shapes only: instant, no memory), as transformers does with {"": "meta"}.
    empty = LavinForConditionalGeneration.from_pretrained(checkpoint[0], device_map={"": "meta"})
    assert {p.device.type for p in empty.parameters()} == {"meta"}


def test_device_map_auto_splits_with_offload_and_runs_identically(checkpoint, inputs, tmp_path):
    from mmadapters.modeling.loading import whole_model_disk_offload_supported

    path, reference = checkpoint
    if not whole_model_disk_offload_supported():  # this budget puts the whole vision tower on disk
        with pytest.raises(LoadingOptionError, match="accelerate < 1.15"):
            LavinForConditionalGeneration.from_pretrained(
                path, device_map="auto", max_memory={"cpu": 120_000}, offload_folder=str(tmp_path / "offload")
            )
        return
    loaded = LavinForConditionalGeneration.from_pretrained(
        path, device_map="auto", max_memory={"cpu": 120_000}, offload_folder=str(tmp_path / "offload")
    )
    devices = loaded.hf_device_map
    # The limit forces a split: some decoder layers on the CPU, the rest offloaded to disk, whole layers only.
    layer_devices = {k: v for k, v in devices.items() if k.startswith("language_model.model.layers.")}
    assert "cpu" in devices.values() and "disk" in devices.values()
    assert all(k.count(".") == 3 for k in layer_devices)  # "language_model.model.layers.N": never cut inside
    # Every adapter sits where its layer computes (offloaded layers compute on the main device, the CPU here).
    for index in range(3):
        assert devices[f"llm_adapters.{index}"] == "cpu"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, reference(**inputs).logits, rtol=0, atol=1e-6)
        kwargs = dict(max_new_tokens=5, do_sample=False)
        assert torch.equal(loaded.generate(**inputs, **kwargs), reference.generate(**inputs, **kwargs))


def test_a_full_checkpoint_offloaded_by_a_device_map_keeps_our_modules_where_they_compute(
    checkpoint, inputs, tmp_path
):
    """A full checkpoint goes through transformers' loader, which offloaded our projector to disk (its weights on
    the meta device: "Cannot copy out of meta tensor" at the first image); our modules now go where they
    compute, as for adapter-only checkpoints."""
    from mmadapters.modeling.loading import whole_model_disk_offload_supported

    path, reference = checkpoint
    full = tmp_path / "full"
    reference.save_pretrained(full, adapter_only=False)
    budget = {"cpu": 200_000} if whole_model_disk_offload_supported() else {"cpu": 400_000}
    loaded = LavinForConditionalGeneration.from_pretrained(
        full, device_map="auto", max_memory=budget, offload_folder=str(tmp_path / "offload")
    )
    devices = loaded.hf_device_map
    assert "disk" in devices.values()
    own = {k: v for k, v in devices.items() if not k.startswith(("language_model", "vision_tower"))}
    assert own and set(own.values()) == {"cpu"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, reference(**inputs).logits, rtol=0, atol=1e-6)


def test_offload_to_disk_needs_an_offload_folder(checkpoint):
    with pytest.raises(LoadingOptionError, match="offload_folder"):
        LavinForConditionalGeneration.from_pretrained(
            checkpoint[0], device_map="auto", max_memory={"cpu": 120_000}
        )


# ---------------------------------------------------------------------------------------------------------------
# Loaded backbones
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["metaclip_2", "blip"])
@pytest.mark.parametrize("model_class", [LavinForConditionalGeneration, CromeForConditionalGeneration])
def test_clip_style_towers_without_an_auto_mapping_load_from_their_full_checkpoints(
    family, model_class, tiny_backbones, tmp_path, randomize_adapters
):
    """MetaCLIP 2 and BLIP vision towers are CLIP-style, but transformers maps no Auto class to their vision
    configs: the tower's class is found from its config's name (MetaClip2VisionConfig -> MetaClip2VisionModel), and
    BLIP keeps it under `vision_model.` as BLIP-2 does. It was refused ("No transformers model class")."""
    import transformers

    vision = tiny_vision_config().to_dict()
    text = {"vocab_size": 99, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    text |= {"num_attention_heads": 2, "max_position_embeddings": 64}
    prefix = {"metaclip_2": "MetaClip2", "blip": "Blip"}[family]
    config = getattr(transformers, f"{prefix}Config")(text_config=text, vision_config=vision)
    torch.manual_seed(0)
    getattr(transformers, f"{prefix}Model")(config).save_pretrained(tmp_path / family)
    saved = getattr(transformers, f"{prefix}VisionModel").from_pretrained(
        tmp_path / family, key_mapping=({r"^vision_model\.": ""} if family == "blip" else None)
    )

    tiny = (
        {"qformer": tiny_qformer_config(), "num_query_tokens": 4}
        if model_class is CromeForConditionalGeneration
        else {}
    )
    model = randomize_adapters(model_class.from_backbones(tiny_backbones[0], str(tmp_path / family), **tiny))
    assert type(model.vision_tower) is type(saved)
    for name, tensor in saved.state_dict().items():
        torch.testing.assert_close(model.vision_tower.state_dict()[name], tensor, msg=name)
    model.save_pretrained(tmp_path / "adapters")
    reloaded = model_class.from_pretrained(tmp_path / "adapters")
    pixels = torch.randn(2, 3, 32, 32)
    # Through the tower: LaVIN's vision adapters are in it.
    torch.testing.assert_close(
        reloaded.vision_tower(pixel_values=pixels).last_hidden_state,
        model.vision_tower(pixel_values=pixels).last_hidden_state,
    )


def test_from_backbones_takes_loaded_models(tiny_backbones, inputs, tmp_path):
    text_path, vision_path = tiny_backbones
    llm = AutoModelForCausalLM.from_pretrained(text_path, dtype=torch.float32)
    tower = CLIPVisionModel.from_pretrained(vision_path, dtype=torch.float32)
    torch.manual_seed(0)
    model = LavinForConditionalGeneration.from_backbones(llm, tower)
    assert model.language_model is llm and model.vision_tower is tower
    assert not any(p.requires_grad for p in llm.parameters())
    by_path = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    assert model.config.text_backbone == by_path.config.text_backbone  # same name and fingerprint
    model.eval().save_pretrained(tmp_path)
    loaded = LavinForConditionalGeneration.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_loaded_models_refuse_a_device_map(tiny_backbones):
    llm = AutoModelForCausalLM.from_pretrained(tiny_backbones[0])
    with pytest.raises(LoadingOptionError, match="stays where it is"):
        LavinForConditionalGeneration.from_backbones(llm, tiny_backbones[1], device_map="cpu")


# ---------------------------------------------------------------------------------------------------------------
# Quantised backbones
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_lavin_lite_4bit_backbone_trains_and_round_trips(tiny_backbones, tmp_path):
    from bitsandbytes.nn import Linear4bit
    from transformers import BitsAndBytesConfig

    text_path = save_llm_with_width(tmp_path / "llm64")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    torch.manual_seed(0)
    model = LavinForConditionalGeneration.from_backbones(
        text_path, tiny_backbones[1], quantization_config={"text_config": quantization}
    )
    assert isinstance(model.language_model.model.layers[0].self_attn.q_proj, Linear4bit)
    assert not any(p.requires_grad for p in model.language_model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert model.config.backbone_quantization["text_config"]["bnb_4bit_quant_type"] == "nf4"
    assert (
        model.config.text_backbone["fingerprint"] is None
        and "quantised" in model.config.text_backbone["note"]
    )

    processor = LavinProcessor.from_backbones(text_path, tiny_backbones[1])
    batch = processor(
        images=[[image(1)], []],
        text=["Image: <image>\nwhat color", "Image: N/A\nthe capital of"],
        answers=["red", "x"],
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    model.eval().save_pretrained(tmp_path / "lite")
    assert os.path.getsize(tmp_path / "lite" / "mmadapters_model.safetensors") < 1_000_000
    loaded = LavinForConditionalGeneration.from_pretrained(
        tmp_path / "lite"
    )  # quantised again, from the record
    assert isinstance(loaded.language_model.model.layers[0].self_attn.q_proj, Linear4bit)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
@pytest.mark.parametrize("model_class", [LavinForConditionalGeneration, CromeForConditionalGeneration])
def test_num_parameters_counts_a_4bit_llm_at_its_real_size(tiny_backbones, tmp_path, model_class):
    """transformers' num_parameters() doubles the packed 4-bit weights only when the top model says it is 4-bit;
    ours is a composite whose LLM alone is, and it reported the 4-bit LLM at half its size."""
    from transformers import BitsAndBytesConfig

    text_path = save_llm_with_width(tmp_path / "llm64")
    full = model_class.from_backbones(text_path, tiny_backbones[1])
    quantised = model_class.from_backbones(
        text_path,
        tiny_backbones[1],
        quantization_config={"text_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")},
    )
    assert quantised.language_model.is_loaded_in_4bit
    for options in ({}, {"exclude_embeddings": True}, {"only_trainable": True}):
        assert quantised.num_parameters(**options) == full.num_parameters(**options), options
    assert full.num_parameters(only_trainable=True) < full.num_parameters(exclude_embeddings=True)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantised_llm_marks_the_model_loaded_in_4bit_or_8bit_however_it_is_loaded(
    tiny_backbones, tmp_path, bits
):
    """transformers marks a model loaded with bitsandbytes, and PEFT, the Trainer and accelerate read the mark on the
    model they are given. Ours was unmarked when built or loaded adapter-only (its LLM alone was marked), while a
    full checkpoint carried transformers' quantizer on the whole model and none on its LLM. Now every way of
    loading gives the same model: the marks are read from the backbones, the quantizer is the LLM's."""
    from transformers import BitsAndBytesConfig

    text_path = save_llm_with_width(tmp_path / "llm64")
    quantization = {"text_config": BitsAndBytesConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8)}
    built = LavinForConditionalGeneration.from_backbones(
        text_path, tiny_backbones[1], quantization_config=quantization
    )
    built.save_pretrained(tmp_path / "adapters")
    built.save_pretrained(tmp_path / "full", adapter_only=False)
    marked, unmarked = f"is_loaded_in_{bits}bit", f"is_loaded_in_{12 - bits}bit"
    given = LavinConfig.from_pretrained(tmp_path / "full")
    for model in (
        built,
        LavinForConditionalGeneration.from_pretrained(tmp_path / "adapters"),
        LavinForConditionalGeneration.from_pretrained(tmp_path / "full"),
        LavinForConditionalGeneration.from_pretrained(tmp_path / "full", output_hidden_states=True),
        LavinForConditionalGeneration.from_pretrained(tmp_path / "full", config=given),
    ):
        assert getattr(model, marked) is True and getattr(model, unmarked) is False
        assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
        assert getattr(model.config, "quantization_config", None) is None
        llm = model.language_model
        assert getattr(llm, marked) is True and llm.is_quantized and llm.hf_quantizer is not None
        assert llm.config.quantization_config.quant_method == "bitsandbytes"
        assert getattr(model.vision_tower, "hf_quantizer", None) is None
    assert getattr(given, "quantization_config", None) is None  # the config given is not changed
    full_precision = LavinForConditionalGeneration.from_backbones(text_path, tiny_backbones[1])
    assert full_precision.is_loaded_in_4bit is False and full_precision.is_loaded_in_8bit is False
    with pytest.raises(AttributeError, match="read from the backbones' weights"):
        full_precision.is_loaded_in_4bit = True


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
@pytest.mark.parametrize("bits", [4, 8])
def test_a_model_loaded_from_a_quantised_full_checkpoint_saves_again_as_both_kinds(
    tiny_backbones, tmp_path, bits
):
    """Saving with every weight a model loaded from a quantised full checkpoint raised NotImplementedError from
    inside transformers: its loader keeps the conversions it read the weights with, to undo them at a save, and
    bitsandbytes' has no undo (a plain transformers model loaded pre-quantised fails the same way)."""
    from transformers import BitsAndBytesConfig

    text_path = save_llm_with_width(tmp_path / "llm64")
    quantization = {"text_config": BitsAndBytesConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8)}
    model = LavinForConditionalGeneration.from_backbones(
        text_path, tiny_backbones[1], quantization_config=quantization
    ).eval()
    batch = LavinProcessor.from_backbones(text_path, tiny_backbones[1])(
        images=[[image(1)]], text=["Image: <image>\nwhat color"]
    )
    model.save_pretrained(tmp_path / "full", adapter_only=False)
    loaded = LavinForConditionalGeneration.from_pretrained(tmp_path / "full")
    loaded.save_pretrained(tmp_path / "full-again", adapter_only=False)
    loaded.save_pretrained(tmp_path / "adapters")
    with torch.no_grad():
        expected = model(**batch).logits
        for kind in ("full-again", "adapters"):
            again = LavinForConditionalGeneration.from_pretrained(tmp_path / kind).eval()
            assert getattr(again, f"is_loaded_in_{bits}bit"), kind
            torch.testing.assert_close(again(**batch).logits, expected, rtol=0, atol=0)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_dequantize_gives_full_precision_backbones_that_both_kinds_of_checkpoint_reload(
    tiny_backbones, tmp_path
):
    """`model.dequantize()` of LaVIN-lite said "You need to first quantize your model" (transformers' quantizer is
    the LLM's), and a full save after the LLM was dequantized recorded it as still quantised: the checkpoint did
    not load. A full save now holds the dequantized LLM; an adapter-only one quantises its source again, which
    rebuilds the same values."""
    from torch import nn
    from transformers import BitsAndBytesConfig

    text_path = save_llm_with_width(tmp_path / "llm64")
    model = LavinForConditionalGeneration.from_backbones(
        text_path,
        tiny_backbones[1],
        quantization_config={"text_config": BitsAndBytesConfig(load_in_4bit=True)},
    ).eval()
    processor = LavinProcessor.from_backbones(text_path, tiny_backbones[1])
    batch = processor(images=[[image(1)]], text=["Image: <image>\nwhat color"])
    with torch.no_grad():
        quantised = model(**batch).logits
    assert model.dequantize() is model
    assert type(model.language_model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not model.is_loaded_in_4bit and getattr(model.language_model, "hf_quantizer", None) is None
    with torch.no_grad():
        dequantized = model(**batch).logits
    torch.testing.assert_close(dequantized, quantised, atol=1e-2, rtol=0)

    model.save_pretrained(tmp_path / "full", adapter_only=False)
    model.save_pretrained(tmp_path / "adapters")
    assert json.loads((tmp_path / "full" / "config.json").read_text())["backbone_quantization"] is None
    full = LavinForConditionalGeneration.from_pretrained(tmp_path / "full").eval()
    adapters = LavinForConditionalGeneration.from_pretrained(tmp_path / "adapters").eval()
    assert not full.is_loaded_in_4bit and adapters.is_loaded_in_4bit
    with torch.no_grad():
        torch.testing.assert_close(full(**batch).logits, dequantized, atol=0, rtol=0)
        torch.testing.assert_close(adapters(**batch).logits, quantised, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="Neither backbone .* is quantised: nothing to dequantize"):
        full.dequantize()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_a_quantised_full_checkpoint_trains_and_the_trainer_never_copies_it_with_data_parallel(
    tiny_backbones, tmp_path
):
    """The Trainer refused a LaVIN-lite full checkpoint ("You cannot perform fine-tuning on purely quantized
    models"): transformers' loader had marked the whole model quantised, adapters included. And with several GPUs
    in one process the Trainer copies a model with DataParallel unless it is marked loaded in 4/8-bit (bitsandbytes
    layers cannot be copied so), which ours was not."""
    from torch import nn
    from transformers import BitsAndBytesConfig

    text_path = save_llm_with_width(tmp_path / "llm64")
    quantization = {"text_config": BitsAndBytesConfig(load_in_4bit=True)}
    LavinForConditionalGeneration.from_backbones(
        text_path, tiny_backbones[1], quantization_config=quantization
    ).save_pretrained(tmp_path / "full", adapter_only=False)
    model = LavinForConditionalGeneration.from_pretrained(tmp_path / "full")
    processor = LavinProcessor.from_backbones(text_path, tiny_backbones[1])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = make_trainer(
        model,
        processor,
        toy_dataset(tmp_path),
        tmp_path / "out",
        max_steps=2,
        training={"save_strategy": "no"},
    )
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)

    trainer.args._n_gpu = 2  # what the Trainer reads to wrap the model in DataParallel
    assert trainer._wrap_model(model, training=False) is model
    full_precision = LavinForConditionalGeneration.from_backbones(text_path, tiny_backbones[1])
    assert isinstance(trainer._wrap_model(full_precision, training=False), nn.DataParallel)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
@pytest.mark.parametrize("bits, tied", [(4, False), (4, True), (8, True)])
def test_lavin_lite_saves_after_inference_and_its_full_checkpoint_quantises_the_llm_alone(
    tiny_backbones, tmp_path, randomize_adapters, bits, tied
):
    """After an inference pass on the CPU (an evaluation during training), bitsandbytes had repacked the 4-bit
    weights in place and the adapter-only save refused as if the LLM had been trained. A full checkpoint reloaded
    with the vision tower and our adapters quantised too (and an LM head tied to the embeddings), and its first
    forward failed inside bitsandbytes."""
    from bitsandbytes.nn import Linear4bit, Linear8bitLt
    from transformers import BitsAndBytesConfig

    text_path = save_llm_with_width(tmp_path / "llm64", tie_word_embeddings=tied)
    quantization = {
        4: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
        8: BitsAndBytesConfig(load_in_8bit=True),
    }[bits]
    torch.manual_seed(0)
    model = LavinForConditionalGeneration.from_backbones(
        text_path, tiny_backbones[1], quantization_config={"text_config": quantization}
    ).eval()
    randomize_adapters(model)
    batch = LavinProcessor.from_backbones(text_path, tiny_backbones[1])(
        images=[[image(1)], []], text=["Image: <image>\nwhat color", "Image: N/A\nthe capital of"]
    )
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path / "adapters")
    model.save_pretrained(tmp_path / "full", adapter_only=False)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, rtol=0, atol=0)  # saving changed nothing

    quantised_class = Linear4bit if bits == 4 else Linear8bitLt
    for folder in ("adapters", "full"):
        loaded = LavinForConditionalGeneration.from_pretrained(tmp_path / folder)
        assert isinstance(loaded.language_model.model.layers[0].self_attn.q_proj, quantised_class)
        assert type(loaded.vision_tower.encoder.layers[0].self_attn.q_proj) is torch.nn.Linear
        assert type(loaded.llm_adapters[0].attn.router) is torch.nn.Linear
        assert type(loaded.language_model.lm_head) is torch.nn.Linear
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(**batch).logits, expected, rtol=0, atol=0)
    loaded.save_pretrained(
        tmp_path / "adapters-again"
    )  # from the full checkpoint: no quantised weights in it
    assert "quantization_config" not in json.loads((tmp_path / "adapters-again" / "config.json").read_text())
    with torch.no_grad():
        again = (
            LavinForConditionalGeneration.from_pretrained(tmp_path / "adapters-again").eval()(**batch).logits
        )
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
    loaded.train()
    loaded(**batch, labels=batch["input_ids"].masked_fill(batch["input_ids"] >= 300, -100)).loss.backward()
    assert loaded.llm_adapters[0].attn.router.weight.grad is not None  # our modules train after a full load


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_a_checkpoint_quantised_at_load_saves_as_it_is_and_a_lite_one_loads_unquantised(
    tiny_backbones, tmp_path, randomize_adapters
):
    """from_pretrained(quantization_config=...) of a full-precision checkpoint, then save: the checkpoint reloaded
    in full precision (the record said so), unlike the model that was saved. And a LaVIN-lite checkpoint loads in
    full precision from a config without the record (its backbones come from their own full-precision source)."""
    from bitsandbytes.nn import Linear8bitLt
    from transformers import BitsAndBytesConfig

    from mmadapters import LavinConfig

    text_path = save_llm_with_width(tmp_path / "llm64")
    torch.manual_seed(0)
    model = randomize_adapters(
        LavinForConditionalGeneration.from_backbones(text_path, tiny_backbones[1])
    ).eval()
    model.save_pretrained(tmp_path / "full-precision")
    ids = torch.tensor([[1, 40, 50, 60]])
    quantised = LavinForConditionalGeneration.from_pretrained(
        tmp_path / "full-precision",
        quantization_config={"text_config": BitsAndBytesConfig(load_in_8bit=True)},
    ).eval()
    quantised.save_pretrained(tmp_path / "lite")
    reloaded = LavinForConditionalGeneration.from_pretrained(tmp_path / "lite").eval()
    assert isinstance(reloaded.language_model.model.layers[0].mlp.down_proj, Linear8bitLt)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids).logits, quantised(input_ids=ids).logits, rtol=0, atol=0
        )

    config = LavinConfig.from_pretrained(tmp_path / "lite")
    config.backbone_quantization = None
    unquantised = LavinForConditionalGeneration.from_pretrained(tmp_path / "lite", config=config).eval()
    assert type(unquantised.language_model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(
            unquantised(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0
        )


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_a_full_checkpoint_quantised_at_load_quantises_the_backbones_alone(
    tiny_backbones, tmp_path, randomize_adapters
):
    """from_pretrained(full checkpoint, quantization_config=...) quantised our adapters too (transformers applies
    one quantisation to the whole model), and the dict form failed inside transformers. Now it computes what the
    adapter-only checkpoint loaded the same way computes, and a checkpoint quantised already refuses a second one."""
    from bitsandbytes.nn import Linear8bitLt
    from transformers import BitsAndBytesConfig

    text_path = save_llm_with_width(tmp_path / "llm64")
    torch.manual_seed(0)
    model = randomize_adapters(
        LavinForConditionalGeneration.from_backbones(text_path, tiny_backbones[1])
    ).eval()
    model.save_pretrained(tmp_path / "adapters")
    model.save_pretrained(tmp_path / "full", adapter_only=False)
    ids = torch.tensor([[1, 40, 50, 60]])
    for quantization in (
        BitsAndBytesConfig(load_in_8bit=True),
        {"text_config": BitsAndBytesConfig(load_in_8bit=True)},
    ):
        full = LavinForConditionalGeneration.from_pretrained(
            tmp_path / "full", quantization_config=quantization
        )
        adapters = LavinForConditionalGeneration.from_pretrained(
            tmp_path / "adapters", quantization_config=quantization
        )
        assert isinstance(full.language_model.model.layers[0].mlp.down_proj, Linear8bitLt)
        assert (
            type(full.llm_adapters[0].attn.router) is torch.nn.Linear
            and type(full.projector.linear_1) is torch.nn.Linear
        )
        vision_quantised = isinstance(full.vision_tower.encoder.layers[0].mlp.fc1, Linear8bitLt)
        assert vision_quantised == (not isinstance(quantization, dict))
        assert full.config.backbone_quantization == adapters.config.backbone_quantization
        with torch.no_grad():
            torch.testing.assert_close(
                full.eval()(input_ids=ids).logits, adapters.eval()(input_ids=ids).logits, rtol=0, atol=0
            )
    full.save_pretrained(tmp_path / "lite-full", adapter_only=False)
    with pytest.raises(LoadingOptionError, match="quantised already"):
        LavinForConditionalGeneration.from_pretrained(
            tmp_path / "lite-full", quantization_config=quantization
        )


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_full_checkpoints_with_lora_on_a_quantised_llm_reload_with_the_lora_in_full_precision(
    tiny_backbones, tmp_path
):
    """LoRA on top of a quantised LLM, saved with every weight: the reload failed in transformers (the LoRA's
    base layers did not match the LLM's). And a full-precision checkpoint with LoRA, quantised at load, quantises
    the LoRA's base layers, never the LoRA's own."""
    from bitsandbytes.nn import Linear8bitLt
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    from mmadapters import add_lora

    text_path = save_llm_with_width(tmp_path / "llm64")
    ids = torch.tensor([[1, 40, 50, 60]])
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    quantization = {"text_config": BitsAndBytesConfig(load_in_8bit=True)}
    torch.manual_seed(0)
    lite = LavinForConditionalGeneration.from_backbones(
        text_path, tiny_backbones[1], quantization_config=quantization
    )
    add_lora(lite.eval(), lora)
    lite.save_pretrained(tmp_path / "lite-lora", adapter_only=False)
    torch.manual_seed(0)
    plain = add_lora(LavinForConditionalGeneration.from_backbones(text_path, tiny_backbones[1]).eval(), lora)
    plain.save_pretrained(tmp_path / "plain-lora", adapter_only=False)
    for folder, expected_model, kwargs in (
        ("lite-lora", lite, {}),
        ("plain-lora", lite, {"quantization_config": quantization}),
    ):
        loaded = LavinForConditionalGeneration.from_pretrained(tmp_path / folder, **kwargs).eval()
        q_proj = loaded.language_model.model.layers[0].self_attn.q_proj
        assert (
            isinstance(q_proj.base_layer, Linear8bitLt) and type(q_proj.lora_A["default"]) is torch.nn.Linear
        )
        with torch.no_grad():
            torch.testing.assert_close(
                loaded(input_ids=ids).logits, expected_model(input_ids=ids).logits, rtol=0, atol=0
            )


@pytest.mark.skipif(importlib.util.find_spec("optimum") is None, reason="optimum-quanto not installed")
def test_quanto_backbone_stays_frozen(tiny_backbones):
    from optimum.quanto import freeze, qint8, quantize
    from transformers import QuantoConfig

    model = LavinForConditionalGeneration.from_backbones(
        *tiny_backbones, quantization_config=QuantoConfig(weights="int8")
    )
    assert "QLinear" in type(model.language_model.model.layers[0].self_attn.q_proj).__name__
    assert not any(p.requires_grad for p in model.language_model.parameters())
    # Quantising in place (quanto's own API) creates parameters that require gradients: freeze_backbones (which our
    # Trainers call before training) freezes them again.
    plain = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    quantize(plain.language_model, weights=qint8)
    freeze(plain.language_model)  # quanto's freeze: stores the quantised weights (as new parameters)
    assert any(p.requires_grad for p in plain.language_model.parameters())
    assert plain.freeze_backbones() > 0
    assert not any(p.requires_grad for p in plain.language_model.parameters())


def test_quantization_needs_weights_to_quantise():
    from transformers import BitsAndBytesConfig

    with pytest.raises(LoadingOptionError, match="config object builds random weights"):
        LavinForConditionalGeneration.from_backbones(
            tiny_text_config(),
            tiny_vision_config(),
            quantization_config=BitsAndBytesConfig(load_in_8bit=True),
        )


# ---------------------------------------------------------------------------------------------------------------
# Model contract details (transformers' common tests check the same)
# ---------------------------------------------------------------------------------------------------------------


def test_missing_adapter_tensor_in_full_checkpoint_gets_its_initialisation(tmp_path):
    from safetensors.torch import load_file, save_file

    model = LavinForConditionalGeneration.from_backbones(tiny_text_config(), tiny_vision_config())
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["llm_adapters.0.attn.expert_b.weight"], weights["projector.linear_1.bias"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = LavinForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(
        loaded.llm_adapters[0].attn.expert_b.weight,
        torch.zeros_like(loaded.llm_adapters[0].attn.expert_b.weight),
    )
    assert torch.equal(loaded.projector.linear_1.bias, torch.zeros_like(loaded.projector.linear_1.bias))
    # Everything the checkpoint had is kept.
    assert torch.equal(loaded.llm_adapters[0].attn.down.weight, model.llm_adapters[0].attn.down.weight)


def test_shift_labels_and_return_dict(checkpoint, tiny_backbones):
    model = checkpoint[1]
    processor = LavinProcessor.from_backbones(*tiny_backbones)
    batch = processor(images=[[image(2)]], text=["Image: <image>\nwhat color"], answers=["red"])
    labels = batch.pop("labels")
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    with torch.no_grad():
        plain = model(**batch, labels=labels).loss
        torch.testing.assert_close(model(**batch, shift_labels=shifted).loss, plain)
        torch.testing.assert_close(model(**batch, labels=labels, shift_labels=shifted).loss, plain)
        as_tuple = model(**batch, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], model(**batch).logits)


def test_image_features_and_embeddings_accessors(checkpoint):
    model = checkpoint[1]
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        output = model.get_image_features(pixels, output_attentions=True)
        torch.testing.assert_close(output.pooler_output, model.image_tokens(pixels))
        assert isinstance(model.get_image_features(pixels, return_dict=False), tuple)
    assert len(output.hidden_states) == 9 and output.attentions is not None
    new_embeddings = torch.nn.Embedding(300, 32)
    model.set_input_embeddings(new_embeddings)
    assert model.language_model.get_input_embeddings() is new_embeddings
    assert not any(k.startswith("embed_tokens") for k in model.state_dict())
    model.resize_token_embeddings(310)
    assert model.get_input_embeddings().num_embeddings == model.get_output_embeddings().out_features == 310
    assert model.config.text_config.vocab_size == 310


def test_resized_token_embeddings_are_saved_in_full_and_reload(tiny_backbones, tmp_path):
    """A token added to the tokenizer and `resize_token_embeddings`: the new (frozen, randomly initialised) rows
    cannot come back from the backbone's source, so an adapter-only save refuses, naming the fix, and a full save
    reloads the same model."""
    from mmadapters.modeling.peft_on_top import PeftOnTopError

    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones).eval()
    processor = LavinProcessor.from_backbones(*tiny_backbones)
    processor.tokenizer.add_tokens(["<extra>"])
    model.resize_token_embeddings(len(processor.tokenizer))
    inputs = processor(text=["Image: N/A\nhello <extra> world"])
    assert (inputs["input_ids"] == len(processor.tokenizer) - 1).any()
    with pytest.raises(PeftOnTopError, match="resized token embeddings.*adapter_only=False"):
        model.save_pretrained(tmp_path / "adapters")
    assert not (tmp_path / "adapters").exists()
    model.save_pretrained(tmp_path / "full", processor=processor, adapter_only=False)
    reloaded = LavinForConditionalGeneration.from_pretrained(tmp_path / "full").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_from_backbones_leaves_the_callers_adapter_config_alone(tiny_backbones):
    from mmadapters import MMAdapterConfig

    adapter_config = MMAdapterConfig(r=4)
    LavinForConditionalGeneration.from_backbones(*tiny_backbones, adapter_config=adapter_config)
    assert adapter_config.base_model_name_or_path is None


def test_no_split_modules_are_the_backbones_layers():
    with torch.device("meta"):
        model = LavinForConditionalGeneration.from_backbones(tiny_text_config(), tiny_vision_config())
    assert {"LlamaDecoderLayer", "CLIPEncoderLayer"} <= set(model._no_split_modules)


def test_other_tokenizer_backbone_passes_through(tmp_path):
    # A second LLM saved by path still loads (guards the tokenizer lookup used for the image token id).
    path = save_tiny_llm(tmp_path / "llm")
    model = LavinForConditionalGeneration.from_backbones(path, tiny_vision_config())
    assert model.config.image_token_id >= 300


def test_deprecation_warnings_under_our_code_fail_the_suite():
    # The autouse guard in conftest.py: a FutureWarning raised while mmadapters code is on the stack is an error.
    import warnings

    from conftest import MMADAPTERS_SOURCE

    code = compile(
        "import warnings\nwarnings.warn('old API', FutureWarning)", f"{MMADAPTERS_SOURCE}/x.py", "exec"
    )
    with pytest.raises(AssertionError, match="FutureWarning raised under mmadapters code"):
        exec(code, {})
    with warnings.catch_warnings(record=True):  # the same warning from elsewhere is only reported
        exec(compile("import warnings\nwarnings.warn('old API', FutureWarning)", "/elsewhere.py", "exec"), {})


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_readme_loading_at_scale_examples_run(tiny_backbones, tmp_path, monkeypatch):
    """The README's "Loading at scale" code, executed with the Hub ids pointed at tiny local backbones."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Loading at scale", 1)[1].split("\n### ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    text_path = save_llm_with_width(tmp_path / "llm64")
    checkpoint = tmp_path / "lavin-scienceqa"
    LavinForConditionalGeneration.from_backbones(text_path, tiny_backbones[1]).save_pretrained(checkpoint)
    for hub_id, local in (
        ("meta-llama/Llama-2-7b-hf", text_path),
        ("openai/clip-vit-large-patch14", tiny_backbones[1]),
        ("you/lavin-scienceqa", str(checkpoint)),
    ):
        assert hub_id in code
        code = code.replace(f'"{hub_id}"', repr(local))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert "4bit" in type(namespace["lite"].language_model.model.layers[0].self_attn.q_proj).__name__
    assert namespace["model"].language_model is namespace["llm"]


@pytest.mark.parametrize("kind", ["lavin", "crome"])
def test_forward_compiles_without_graph_breaks(kind):
    import torch._dynamo as dynamo
    from conftest import tiny_model_from_configs

    torch.manual_seed(0)
    model = tiny_model_from_configs(kind).eval()
    inputs = {"input_ids": torch.tensor([[1] + [300] * model.config.num_image_tokens + [40, 50]])}
    if kind == "crome":
        inputs["qformer_input_ids"] = torch.tensor([[5, 6, 7]])
    inputs["pixel_values"] = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(
            **inputs
        ).logits  # eager once (transformers installs its output hooks on the first call)
        explanation = dynamo.explain(model)(**inputs)
        assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
        torch.testing.assert_close(
            torch.compile(model, fullgraph=True)(**inputs).logits, expected, atol=1e-5, rtol=0
        )


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_8bit_backbone_loads_runs_and_round_trips(tiny_backbones, tmp_path):
    from bitsandbytes.nn import Linear8bitLt
    from transformers import BitsAndBytesConfig

    text_path = save_llm_with_width(tmp_path / "llm64")
    torch.manual_seed(0)
    model = LavinForConditionalGeneration.from_backbones(
        text_path,
        tiny_backbones[1],
        quantization_config={"text_config": BitsAndBytesConfig(load_in_8bit=True)},
    ).eval()
    assert isinstance(model.language_model.model.layers[0].mlp.down_proj, Linear8bitLt)
    assert model.config.backbone_quantization["text_config"]["load_in_8bit"] is True
    ids = torch.tensor([[1, 40, 50, 60]])
    model.save_pretrained(tmp_path / "ckpt")
    loaded = LavinForConditionalGeneration.from_pretrained(tmp_path / "ckpt")
    assert isinstance(loaded.language_model.model.layers[0].mlp.down_proj, Linear8bitLt)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantised_model_refuses_dtype_casts_as_transformers_does_and_loses_nothing(
    tiny_backbones, tmp_path, bits
):
    """transformers refuses `.to(dtype)`, `.half()` and `.float()` of a bitsandbytes model (and `.cuda()` of an
    8-bit one): the dtype is chosen at loading. LaVIN-lite's casts went through and turned our float32 adapters and
    the LLM's unquantised layers to float16. They are now refused the same way, before anything changes; device
    moves still work, and a dequantized model casts."""
    from transformers import BitsAndBytesConfig

    quantization = {"text_config": BitsAndBytesConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8)}
    model = LavinForConditionalGeneration.from_backbones(
        save_llm_with_width(tmp_path / "llm64"), tiny_backbones[1], quantization_config=quantization
    )
    before = {name: parameter.dtype for name, parameter in model.named_parameters()}
    casts = {
        ".half()": lambda: model.half(),
        ".float()": lambda: model.float(),
        ".bfloat16()": lambda: model.bfloat16(),
        ".double()": lambda: model.double(),
        ".to(a float16 tensor)": lambda: model.to(torch.zeros(1, dtype=torch.float16)),
        ".to(torch.float16)": lambda: model.to(torch.float16),
        ".to('cpu', torch.bfloat16)": lambda: model.to("cpu", torch.bfloat16),
        ".to(dtype=torch.float16)": lambda: model.to(dtype=torch.float16),
    }
    if bits == 8:
        casts[".cuda()"] = lambda: model.cuda()
    for call, cast in casts.items():
        with pytest.raises(
            ValueError, match=rf"LavinForConditionalGeneration has a {bits}-bit .*(dtype=|device_map=)"
        ):
            cast()
        assert {name: parameter.dtype for name, parameter in model.named_parameters()} == before, call
    assert model.to("cpu") is model and model.to(torch.device("cpu")) is model
    model.dequantize()
    assert model.half() is model and model.language_model.dtype == torch.float16
    assert {tensor.dtype for tensor in model.adapter_state_dict().values()} == {torch.float16}


@pytest.mark.parametrize("model_class", [LavinForConditionalGeneration, CromeForConditionalGeneration])
def test_every_way_of_building_or_loading_returns_the_whole_model_in_eval_mode(
    tiny_backbones, tmp_path, model_class
):
    """As transformers' from_pretrained does: from_backbones gave our modules in training mode around backbones in
    eval mode (CROME's Q-Former dropout made two forward passes of the new model differ), or backbones in training
    mode when built from config objects. Now every way gives one mode, eval; a Trainer (or `model.train()`) turns
    training mode on."""
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionModel

    text_path, vision_path = tiny_backbones
    ways = {
        "paths": lambda: model_class.from_backbones(text_path, vision_path),
        "config objects": lambda: model_class.from_backbones(
            AutoConfig.from_pretrained(text_path), AutoConfig.from_pretrained(vision_path)
        ),
        "models in training mode": lambda: model_class.from_backbones(
            AutoModelForCausalLM.from_pretrained(text_path).train(),
            CLIPVisionModel.from_pretrained(vision_path).train(),
        ),
    }
    built = ways["paths"]()
    built.save_pretrained(tmp_path / "adapters")
    built.save_pretrained(tmp_path / "full", adapter_only=False)
    ways["adapter-only checkpoint"] = lambda: model_class.from_pretrained(tmp_path / "adapters")
    ways["full checkpoint"] = lambda: model_class.from_pretrained(tmp_path / "full")
    for way, build in ways.items():
        model = build()
        assert [name for name, module in model.named_modules() if module.training] == [], way
        assert all(module.training for module in model.train().modules()), way


# ---------------------------------------------------------------------------------------------------------------
# A loaded backbone belongs to one model
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("second", ["lavin", "crome"])
@pytest.mark.parametrize("first", ["lavin", "crome"])
def test_a_loaded_backbone_that_another_model_holds_is_refused_before_it_is_touched(
    tiny_backbones, checkpoint, inputs, first, second
):
    """Our models change their backbones in place (LaVIN's adapters are hooks on the layers; PEFT layers sit
    inside): two LaVINs built on one loaded LLM each ran the other's adapters, both silently wrong. A backbone that
    another live model holds is refused, the backbone left as it was; once that model is gone (a LaVIN's hooks
    removed first), it can be used again."""
    from mmadapters import BackboneInUseError

    def build(kind, llm, vision):
        if kind == "lavin":
            return LavinForConditionalGeneration.from_backbones(llm, vision)
        return CromeForConditionalGeneration.from_backbones(
            llm, vision, qformer=tiny_qformer_config(), num_query_tokens=4
        )

    path, saved = checkpoint
    expected = saved(**inputs).logits
    held = build(first, AutoModelForCausalLM.from_pretrained(tiny_backbones[0]), tiny_backbones[1])
    llm = held.language_model
    attention = llm.config._attn_implementation
    release = (
        "call its remove_adapter_hooks"
        if first == "lavin"
        else r"free it from the other model first \(delete"
    )
    with pytest.raises(BackboneInUseError, match=f"already part of a {type(held).__name__}.*{release}"):
        build(second, llm, tiny_backbones[1])
    with pytest.raises(BackboneInUseError, match="already part of"):
        LavinForConditionalGeneration.from_pretrained(path, text_model=llm, attn_implementation="eager")
    with pytest.raises(BackboneInUseError, match="vision backbone passed in is already part of"):
        build(second, tiny_backbones[0], held.vision_tower)
    assert llm.config._attn_implementation == attention, "the refused backbone was changed"
    if first == "lavin":
        other = build("lavin", AutoModelForCausalLM.from_pretrained(tiny_backbones[0]), tiny_backbones[1])
        other_llm = other.language_model
        del other  # deleted, but its adapters stay hooked into the LLM's layers
        with pytest.raises(BackboneInUseError, match="still carries the adapter hooks of a LaVIN"):
            build(second, other_llm, tiny_backbones[1])
        held.remove_adapter_hooks()
    del held
    reused = LavinForConditionalGeneration.from_pretrained(path, text_model=llm)  # nobody holds it now
    torch.testing.assert_close(reused(**inputs).logits, expected)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_the_vision_half_of_a_full_checkpoint_loads_without_a_load_report(tiny_backbones, tmp_path, kind):
    """A full CLIP / SigLIP checkpoint (openai/clip-vit-large-patch14, LaVIN's tower, is one) as the vision tower:
    its vision half is loaded, every weight of it. Before: transformers logged a load report listing the whole text
    half as UNEXPECTED (a screen of lines at every from_backbones and every from_pretrained of an adapter-only
    checkpoint); it is expected here, so it is not reported. A missing vision weight is still refused."""
    from conftest import tiny_vision_config
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    text = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=99
    )
    config_class, model_class = (CLIPConfig, CLIPModel) if kind == "clip" else (SiglipConfig, SiglipModel)
    torch.manual_seed(0)
    full = model_class(config_class(vision_config=tiny_vision_config(kind).to_dict(), text_config=text))
    full.save_pretrained(tmp_path / "full")
    records = []
    collect = logging.Handler()
    collect.emit = records.append
    logging.getLogger("transformers").addHandler(collect)  # transformers' loggers do not propagate further
    try:
        model = LavinForConditionalGeneration.from_backbones(tiny_backbones[0], str(tmp_path / "full"))
    finally:
        logging.getLogger("transformers").removeHandler(collect)
    assert not [r for r in records if "LOAD REPORT" in r.getMessage()], records[0].getMessage()[:500]
    expected = {
        key.removeprefix("vision_model."): value
        for key, value in full.state_dict().items()
        if key.startswith("vision_model.")
    }
    loaded = model.vision_tower.state_dict()
    assert expected.keys() == loaded.keys()
    assert all(torch.equal(expected[key], loaded[key]) for key in expected)

    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "full" / "model.safetensors")
    del weights["vision_model.post_layernorm.weight"]
    save_file(weights, tmp_path / "full" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BackboneWeightsMissingError, match="post_layernorm.weight would be random"):
        LavinForConditionalGeneration.from_backbones(tiny_backbones[0], str(tmp_path / "full"))
