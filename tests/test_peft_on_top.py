"""LoRA (any PEFT method) on top of LaVIN and CROME: scoped injection, one checkpoint with every trained tensor,
PEFT's own entry points (get_peft_model, load_adapter, merge_and_unload), Trainers and resume, file names that
never collide with PEFT's."""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
import warnings

import pytest
import torch
from conftest import (
    make_trainer,
    save_llm_with_width,
    save_tiny_llm,
    save_tiny_vision,
    tiny_qformer_config,
    toy_dataset,
)
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

import mmadapters
from mmadapters import (
    BackboneChangedError,
    CromeForConditionalGeneration,
    CromeProcessor,
    LavinForConditionalGeneration,
    LavinProcessor,
    PeftOnTopError,
    add_lora,
)
from mmadapters.convert.merge import merge_lavin_adapters
from mmadapters.modeling.loading import LoadingOptionError
from mmadapters.modeling.peft_on_top import name_through_peft_layers, tuner_layers
from mmadapters.trainers import CromeTrainer


def lora(**overrides):
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **overrides})


@pytest.fixture()
def lavin(tiny_backbones):
    torch.manual_seed(0)
    return LavinForConditionalGeneration.from_backbones(*tiny_backbones)


@pytest.fixture()
def processor(tiny_backbones):
    return LavinProcessor.from_backbones(*tiny_backbones)


def inputs(processor):
    from conftest import tiny_sample_inputs

    return tiny_sample_inputs(processor)


def randomize_trainable(model, seed=3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def lora_places(model):
    return sorted({name.split(".", 1)[0] for name, _ in tuner_layers(model)})


# --- scoped injection -------------------------------------------------------------------------------------------


def test_add_lora_goes_into_the_llm_only_and_our_adapters_keep_training(lavin):
    add_lora(lavin, lora())
    assert lora_places(lavin) == ["language_model"]
    trainable = {n.split(".", 1)[0] for n, p in lavin.named_parameters() if p.requires_grad}
    assert trainable == {
        "language_model",
        "llm_adapters",
        "vision_adapters",
        "projector",
        "modality_embedding",
    }
    # In the LLM only the LoRA tensors train.
    assert all(".lora_" in n for n, p in lavin.language_model.named_parameters() if p.requires_grad), (
        "a base weight of the LLM trains"
    )
    assert lavin.config.peft_adapters["default"]["on"] == "language_model"
    # Our Trainers re-freeze the backbones before training: the LoRA tensors must survive that.
    lavin.freeze_backbones()
    assert any(p.requires_grad for n, p in lavin.named_parameters() if ".lora_" in n)


@pytest.mark.parametrize(
    "on, places", [("vision_tower", ["vision_tower"]), ("both", ["language_model", "vision_tower"])]
)
def test_add_lora_on_the_vision_tower_or_both(lavin, on, places):
    add_lora(lavin, lora(), on=on)
    assert lora_places(lavin) == places


def test_add_adapter_is_transformers_api_scoped_to_the_llm(lavin):
    # transformers 5.24's own add_adapter wants peft >= 0.22; ours works with the pinned peft.
    lavin.add_adapter(lora(), adapter_name="mine")
    assert lora_places(lavin) == ["language_model"] and lavin.active_adapters() == ["mine"]


def test_refusals_say_what_is_wrong(lavin):
    with pytest.raises(PeftOnTopError, match="modules_to_save"):
        add_lora(lavin, lora(modules_to_save=["llm_adapters"]))
    with pytest.raises(PeftOnTopError, match="on='decoder'"):
        add_lora(lavin, lora(), on="decoder")
    with pytest.raises(PeftOnTopError, match="nothing to adapt in language_model"):
        add_lora(lavin, lora(target_modules=["no_such_layer"]))
    with pytest.raises(PeftOnTopError, match=r"LoraConfig\(bias='all'\) trains the backbones' biases"):
        add_lora(lavin, lora(bias="all"))
    add_lora(lavin, lora())
    with pytest.raises(PeftOnTopError, match="already has a PEFT adapter named 'default'"):
        add_lora(lavin, lora())


def peft_state(model):
    """What a PEFT add or load may change: the parameters (names, values, which train), the active adapters, the
    record in config.json and PEFT's configs on the model and its backbones."""
    parameters = {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()}
    configs = [
        sorted(vars(m).get("peft_config") or {}) for m in (model, model.language_model, model.vision_tower)
    ]
    return parameters, model.active_adapters(), dict(model.config.peft_adapters or {}), configs


def assert_same_peft_state(model, before):
    parameters, active, record, configs = peft_state(model)
    assert sorted(parameters) == sorted(before[0])
    for name, (value, trains) in parameters.items():
        assert torch.equal(value, before[0][name][0]) and trains == before[0][name][1], name
    assert (active, record, configs) == before[1:]


def test_a_second_named_adapter_adds_quietly_and_a_failed_one_leaves_the_model_as_it_was(
    lavin, processor, tiny_backbones, tmp_path
):
    """A second `add_adapter` showed PEFT's "Already found a `peft_config` attribute ... Make sure to know what you
    are doing!" warning (PeftModel.add_adapter does not warn). An add or load that failed left things behind: the
    failed adapter's config in the LLM's `peft_config`, the LLM's layers of an adapter that then failed on the
    vision tower (`on="both"`), the earlier adapter made inactive (PEFT activates the new one everywhere), and a
    `load_adapter` of a file from another base model an injected, recorded adapter of random weights. Now a
    failure leaves the model computing, training and recording exactly what it did."""
    lavin.add_adapter(lora(target_modules=["q_proj"], init_lora_weights=False), adapter_name="a")
    batch = inputs(processor)
    expected = logits(lavin, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lavin.add_adapter(lora(target_modules=["v_proj"]), adapter_name="b")
    lavin.delete_adapter("b")
    lavin.set_adapter("a")
    before = peft_state(lavin)
    with pytest.raises(PeftOnTopError, match="nothing to adapt in language_model"):
        lavin.add_adapter(lora(target_modules=["no_such_layer"]), adapter_name="c")
    assert_same_peft_state(lavin, before)
    # The LLM has gate_proj, the CLIP tower has not: injected into the LLM, then refused on the tower.
    with pytest.raises(PeftOnTopError, match="nothing to adapt in vision_tower"):
        lavin.add_adapter(
            lora(target_modules=["gate_proj"], init_lora_weights=False), adapter_name="c", on="both"
        )
    assert_same_peft_state(lavin, before)
    torch.testing.assert_close(logits(lavin, batch), expected)
    # A PEFT adapter trained on an LLM of another width: its tensors do not fit.
    other = get_peft_model(
        AutoModelForCausalLM.from_pretrained(save_llm_with_width(tmp_path / "wide", 48)), lora()
    )
    other.save_pretrained(tmp_path / "wide-lora")
    with pytest.raises(PeftOnTopError, match="other shapes"):
        lavin.load_adapter(tmp_path / "wide-lora", adapter_name="c")
    assert_same_peft_state(lavin, before)
    torch.testing.assert_close(logits(lavin, batch), expected)
    lavin.add_adapter(lora(target_modules=["v_proj"]), adapter_name="c")  # the name is free again
    lavin.set_adapter("a")
    lavin.save_pretrained(tmp_path / "ck")
    reloaded = LavinForConditionalGeneration.from_pretrained(tmp_path / "ck")
    assert sorted(reloaded.config.peft_adapters) == ["a", "c"]
    torch.testing.assert_close(logits(reloaded, batch), expected)


def test_adapter_calls_with_no_or_unknown_peft_adapters_are_refused_and_change_nothing(lavin, processor):
    """delete_adapter / disable_adapters / enable_adapters / get_adapter_state_dict did nothing (or returned {})
    for a name the model does not hold or a model without PEFT adapters, and delete_adapter(["a", "x"]) removed
    "a" before finding "x" missing; transformers raises ValueError there. `disable_adapters()` on a LaVIN without
    LoRA silently left LaVIN's own adapters on."""
    for call in (
        lambda: lavin.disable_adapters(),
        lambda: lavin.enable_adapters(),
        lambda: lavin.delete_adapter("default"),
        lambda: lavin.set_adapter("default"),
        lambda: lavin.get_adapter_state_dict(),
    ):
        with pytest.raises(
            ValueError, match=r"No PEFT adapter loaded: nothing to \w+\. .* own adapters are not PEFT"
        ):
            call()
    assert lavin.active_adapters() == []
    add_lora(lavin, lora(init_lora_weights=False), adapter_name="a")
    batch = inputs(processor)
    expected = logits(lavin, batch)
    for call in (
        lambda: lavin.delete_adapter(["a", "x"]),
        lambda: lavin.set_adapter(["a", "x"]),
        lambda: lavin.get_adapter_state_dict("x"),
    ):
        with pytest.raises(PeftOnTopError, match=r"No PEFT adapter named \['x'\]: the model has \['a'\]"):
            call()
    assert lavin.active_adapters() == ["a"] and list(lavin.config.peft_adapters) == ["a"]
    torch.testing.assert_close(logits(lavin, batch), expected)
    assert (
        lavin.get_adapter_state_dict()
        and lavin.get_adapter_state_dict().keys() == lavin.get_adapter_state_dict("a").keys()
    )


@pytest.mark.parametrize("on", ["language_model", "both"])
def test_get_adapter_state_dict_returns_the_tensors_as_peft_saves_them(
    lavin, tiny_backbones, processor, tmp_path, on
):
    """transformers' `get_adapter_state_dict` returns PEFT's saved form (`get_peft_model_state_dict`: keys without
    the adapter name, DoRA's magnitude vector under PEFT's name), which a PEFT adapter file holds; ours returned the
    model's own keys, adapter name included. Written as `PeftModel.save_pretrained` writes it, it loads back."""
    from safetensors.torch import save_file

    add_lora(lavin, lora(use_dora=True, init_lora_weights=False), on=on, adapter_name="task")
    state = lavin.get_adapter_state_dict("task")
    assert state and not [key for key in state if ".task" in key]
    assert {key.split(".", 1)[0] for key in state} == set(SCOPES_OF[on])
    magnitude = next(key for key in state if "lora_magnitude_vector" in key)
    assert magnitude.endswith(".lora_magnitude_vector")  # PEFT's saved name (its layer holds `.task.weight`)
    layer = lavin.get_submodule(magnitude.removesuffix(".lora_magnitude_vector"))
    assert state[magnitude] is layer.lora_magnitude_vector["task"].weight or torch.equal(
        state[magnitude], layer.lora_magnitude_vector["task"].weight
    )
    batch = inputs(processor)
    expected = logits(lavin, batch)
    scopes = "|".join(SCOPES_OF[on])
    lora(use_dora=True, target_modules=rf".*({scopes}).*\.(q_proj|v_proj)").save_pretrained(tmp_path / "task")
    save_file(
        {f"base_model.model.{key}": value for key, value in state.items()},
        tmp_path / "task" / "adapter_model.safetensors",
    )
    torch.manual_seed(0)
    fresh = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    fresh.load_state_dict(lavin.adapter_state_dict(), strict=False)  # LaVIN's own adapters, as they are
    fresh.load_adapter(tmp_path / "task", adapter_name="task")
    torch.testing.assert_close(logits(fresh, batch), expected)
    # transformers' other form of load_adapter: the state dict with its config, no file.
    config = lora(use_dora=True, target_modules=rf".*({scopes}).*\.(q_proj|v_proj)")
    fresh.load_adapter(adapter_state_dict=state, peft_config=config, adapter_name="again")
    fresh.set_adapter("again")
    torch.testing.assert_close(logits(fresh, batch), expected)
    assert config.inference_mode is False  # the caller's config is left as it was
    for wrong in (
        {"adapter_state_dict": state},
        {"peft_model_id": tmp_path / "task", "adapter_state_dict": state},
    ):
        with pytest.raises(PeftOnTopError, match="adapter_state_dict together with its peft_config"):
            fresh.load_adapter(**wrong, peft_config=None if "peft_model_id" not in wrong else config)


SCOPES_OF = {"language_model": ["language_model"], "both": ["language_model", "vision_tower"]}


def test_adapter_calls_know_the_adapters_of_a_get_peft_model_wrapper_not_yet_adopted(tiny_backbones):
    """The names come from the model's layers too: right after `get_peft_model` (before a Trainer adopts the
    wrapper and records it) the model's own adapter calls find PEFT's adapter."""
    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    get_peft_model(model, lora())
    assert model.active_adapters() == ["default"] and model.get_adapter_state_dict()
    model.disable_adapters()
    model.enable_adapters()
    with pytest.raises(PeftOnTopError, match=r"No PEFT adapter named \['x'\]: the model has \['default'\]"):
        model.delete_adapter("x")


def test_a_peft_model_that_trains_backbone_biases_is_refused_by_adoption(lavin, processor, tmp_path):
    """bias='all' / 'lora_only' train the backbones' biases; our Trainers froze them again with a warning (the
    option silently not honoured). Refused before anything trains."""
    peft_model = get_peft_model(lavin, lora(bias="lora_only"))
    with pytest.raises(PeftOnTopError, match=r"bias='lora_only'\) trains the backbones' biases"):
        make_trainer(peft_model, processor, toy_dataset(tmp_path, n=8), tmp_path / "run", max_steps=1)


@pytest.mark.parametrize("how", ["TrainableTokensConfig", "trainable_token_indices"])
def test_trainable_tokens_on_the_llm_embeddings_train_and_round_trip(lavin, processor, tmp_path, how):
    """PEFT's trainable tokens (alone, or LoRA's `trainable_token_indices`) wrap the LLM's input embeddings; the
    forward read the vocabulary size from the wrapper and failed with AttributeError ('num_embeddings'), and the
    merge of LoRA's wrapper took out its token adapter and left the wrapper (AttributeError at the next call)."""
    from peft import TrainableTokensConfig

    batch = inputs(processor)
    text = processor(text=["Image: N/A\nthe capital of"])
    vocab_size = lavin.config.text_config.vocab_size
    tokens = sorted({int(t) for t in (*batch["input_ids"][0], *text["input_ids"][0]) if int(t) < vocab_size})
    if how == "TrainableTokensConfig":
        config = TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=tokens)
    else:
        config = lora(trainable_token_indices=tokens)
    model = mmadapters.adopt_peft_model(get_peft_model(lavin, config))
    assert model.freeze_backbones() == 0
    before = logits(model, batch)
    randomize_trainable(model)
    expected = logits(model, batch)
    assert not torch.allclose(expected, before)
    model.save_pretrained(tmp_path / "ck")
    assert any(
        "trainable_tokens_delta" in key for key in load_file(tmp_path / "ck" / "mmadapters_model.safetensors")
    )
    reloaded = LavinForConditionalGeneration.from_pretrained(tmp_path / "ck")
    torch.testing.assert_close(logits(reloaded, batch), expected)
    text_logits = logits(reloaded, text)
    merged = merge_lavin_adapters(reloaded, "text")
    assert type(merged.get_input_embeddings()) is torch.nn.Embedding
    with torch.no_grad():
        torch.testing.assert_close(merged(**text).logits, text_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("how", ["TrainableTokensConfig", "trainable_token_indices", "lora_on_lm_head"])
def test_peft_layers_on_tied_embeddings_reload_from_both_kinds_of_checkpoint(tiny_backbones, tmp_path, how):
    """An LLM whose input and output embeddings are tied (SmolLM2, T5, ...): a PEFT layer on a tied module holds
    its weight under its base layer. A load rebuilt the layers before transformers tied the weights by their plain
    names (AttributeError "embed_tokens.weight is neither a parameter...", or "attribute 'weight' already
    exists"), a full save refused the tied copy ("shared tensors which are not properly defined"), and the merged
    export was wrong."""
    from conftest import save_llm_with_width
    from peft import TrainableTokensConfig

    text_path = save_llm_with_width(tmp_path / "tied-llm", hidden_size=32, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LavinForConditionalGeneration.from_backbones(text_path, tiny_backbones[1])
    processor = LavinProcessor.from_backbones(text_path, tiny_backbones[1])
    batch = inputs(processor)
    vocab_size = model.config.text_config.vocab_size
    tokens = sorted({int(t) for t in batch["input_ids"][0] if int(t) < vocab_size})
    config = {
        "TrainableTokensConfig": TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=tokens),
        "trainable_token_indices": lora(trainable_token_indices=tokens),
        "lora_on_lm_head": lora(target_modules=["q_proj", "lm_head"]),
    }[how]
    model = mmadapters.adopt_peft_model(get_peft_model(model, config))
    randomize_trainable(model)
    expected = logits(model, batch)
    for adapter_only in (True, False):
        folder = tmp_path / ("adapters" if adapter_only else "full")
        model.save_pretrained(folder, adapter_only=adapter_only)
        reloaded = LavinForConditionalGeneration.from_pretrained(folder)
        reloaded.tie_weights()  # a user's call recomputes the mapping from the modules: PEFT's names there too
        llm = reloaded.language_model
        assert name_through_peft_layers(llm, "lm_head.weight") != "lm_head.weight" or how != "lora_on_lm_head"
        assert llm.get_parameter(name_through_peft_layers(llm, "lm_head.weight")) is llm.get_parameter(
            name_through_peft_layers(llm, "model.embed_tokens.weight")
        ), "the reloaded LLM's embeddings are no longer tied"
        torch.testing.assert_close(logits(reloaded, batch), expected)

    # The merge gives the tied weight under a PEFT layer its own copy: merged into the one shared tensor, the
    # LM head's LoRA changed the input embeddings too (logits off by 5 at this size), and trainable tokens
    # were merged twice into it.
    text = processor(text=["Image: N/A\nthe capital of"])
    text_logits = logits(reloaded, text)
    merged = merge_lavin_adapters(reloaded, "text")
    assert merged.config.tie_word_embeddings is False
    merged.save_pretrained(tmp_path / "merged")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(exported(**text).logits, text_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["VeraConfig", "RandLoraConfig"])
def test_peft_methods_whose_layers_share_tensors_are_refused_before_anything_trains(
    lavin, processor, tmp_path, method
):
    """VeRA, VB-LoRA and RandLoRA share tensors between the layers they adapt (random projections, a trained
    vector bank). A Trainer given such a PeftModel trained it, then crashed at its first checkpoint in
    safetensors ("Some tensors share memory"), and a load could not rebuild the layers anyway. They are refused
    where they come in: the Trainer (PEFT marks VeRA; RandLoRA is found from the tensors themselves),
    `add_adapter` (the model is left as it was) and a save of an unadopted PeftModel's model (nothing written)."""
    import peft

    config = getattr(peft, method)(r=4, target_modules=["q_proj", "v_proj"])
    batch = inputs(processor)
    before = logits(lavin, batch)
    with pytest.raises(PeftOnTopError, match=f"{method} shares tensors between the layers it adapts"):
        lavin.add_adapter(config)
    assert lora_places(lavin) == [] and not lavin.config.peft_adapters
    assert not hasattr(lavin.language_model, "peft_config")
    torch.testing.assert_close(logits(lavin, batch), before)
    lavin.save_pretrained(tmp_path / "still-saves")  # the refused layers left nothing behind

    peft_model = get_peft_model(lavin, config)
    with pytest.raises(PeftOnTopError, match="PeftModel.save_pretrained saves this one without our modules"):
        make_trainer(peft_model, processor, toy_dataset(tmp_path, n=8), tmp_path / "run", max_steps=1)
    assert not (tmp_path / "run").exists() or not os.listdir(tmp_path / "run")
    with pytest.raises(PeftOnTopError, match=f"{method} shares tensors"):
        peft_model.get_base_model().save_pretrained(tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_prompt_learning_methods_are_refused(lavin):
    from peft import AdaptionPromptConfig, PrefixTuningConfig

    for config in (
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        AdaptionPromptConfig(adapter_len=4, adapter_layers=1, task_type="CAUSAL_LM"),
    ):
        with pytest.raises(PeftOnTopError, match=f"{type(config).__name__} is a prompt-learning method"):
            lavin.add_adapter(config)


# --- one checkpoint with every trained tensor -------------------------------------------------------------------


def other_peft_method(name):
    """The README's "any PEFT method that injects layers", beyond plain LoRA, at tiny size."""
    from peft import IA3Config, LoHaConfig, LoKrConfig, OFTConfig

    projections = ["q_proj", "v_proj"]
    return {
        "dora": lambda: lora(use_dora=True),
        "loha": lambda: LoHaConfig(r=4, target_modules=projections),
        "lokr": lambda: LoKrConfig(r=4, target_modules=projections),
        "ia3": lambda: IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "oft": lambda: OFTConfig(r=0, oft_block_size=8, target_modules=projections),
    }[name]()


@pytest.mark.parametrize("method", ["dora", "loha", "lokr", "ia3", "oft"])
def test_other_peft_methods_on_both_backbones_round_trip(lavin, processor, tmp_path, method):
    """DoRA, LoHa, LoKr, IA3 and OFT layers on the LLM and the vision tower reload from an adapter-only and a full
    checkpoint to identical logits (and change them: the comparison is not vacuous)."""
    batch = inputs(processor)
    without = logits(lavin, batch)
    lavin.add_adapter(other_peft_method(method), on="both")
    assert lora_places(lavin) == ["language_model", "vision_tower"]
    randomize_trainable(lavin)
    expected = logits(lavin, batch)
    assert not torch.allclose(expected, without)
    for adapter_only in (True, False):
        folder = tmp_path / ("adapters" if adapter_only else "full")
        lavin.save_pretrained(folder, adapter_only=adapter_only)
        reloaded = LavinForConditionalGeneration.from_pretrained(folder)
        assert lora_places(reloaded) == ["language_model", "vision_tower"]
        torch.testing.assert_close(logits(reloaded, batch), expected, rtol=0, atol=0)


# PEFT's BOFT tries to build its CUDA kernel and says so on a machine without CUDA (upstream, not ours).
@pytest.mark.filterwarnings(
    "ignore:Failed to load the CUDA extension", "ignore:Setting boft_n_butterfly_factor"
)
def test_boft_round_trips_adapter_only_and_a_full_save_is_refused_before_writing(lavin, processor, tmp_path):
    """PEFT cannot create BOFT layers on the meta device, where transformers builds a full checkpoint's model (its
    load failed with "Tensor.item() cannot be called on meta tensors"): a full save is refused up front."""
    from peft import BOFTConfig

    batch = inputs(processor)
    lavin.add_adapter(
        BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1, target_modules=["q_proj", "v_proj"])
    )
    randomize_trainable(lavin)
    expected = logits(lavin, batch)
    lavin.save_pretrained(tmp_path / "adapters")
    reloaded = LavinForConditionalGeneration.from_pretrained(tmp_path / "adapters")
    torch.testing.assert_close(logits(reloaded, batch), expected, rtol=0, atol=0)
    with pytest.raises(
        PeftOnTopError, match="BOFT, whose layers cannot be rebuilt by a full checkpoint's load"
    ):
        lavin.save_pretrained(tmp_path / "full", adapter_only=False)
    assert not (tmp_path / "full").exists()


def test_two_peft_methods_on_one_module_reload_nested_as_they_were_added(lavin, processor, tmp_path):
    """An OFT adapter, then a LoRA on the same projections: PEFT nests the LoRA layer around the OFT layer, and the
    tensors are named by that nesting. config.json sorts the record's keys ("lora" before "oft"), and a load
    injected in that order: the adapter-only load refused the tensors as another model's, the full one loaded
    uninitialised memory. Both reload to identical logits for every choice of active adapters."""
    from peft import OFTConfig

    batch = inputs(processor)
    lavin.add_adapter(OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "v_proj"]), "oft", on="both")
    lavin.add_adapter(lora(target_modules=["q_proj", "o_proj"]), "lora")
    randomize_trainable(lavin)
    for active in (["oft"], ["lora"], ["oft", "lora"]):
        lavin.set_adapter(active)
        expected = logits(lavin, batch)
        for adapter_only in (True, False):
            folder = tmp_path / f"{'-'.join(active)}-{adapter_only}"
            lavin.save_pretrained(folder, adapter_only=adapter_only)
            reloaded = LavinForConditionalGeneration.from_pretrained(folder)
            assert reloaded.active_adapters() == active
            torch.testing.assert_close(logits(reloaded, batch), expected, rtol=0, atol=0)
    assert list(reloaded.config.peft_adapters) == [
        "oft",
        "lora",
    ]  # the injection order, kept for the next save


def test_lora_and_adapters_round_trip_in_one_folder(lavin, processor, tmp_path):
    add_lora(lavin, lora(), on="both")
    randomize_trainable(lavin)
    batch = inputs(processor)
    expected = logits(lavin, batch)
    lavin.save_pretrained(tmp_path / "ck")
    files = sorted(os.listdir(tmp_path / "ck"))
    assert files == [
        "config.json",
        "generation_config.json",
        "mmadapters_loader.py",
        "mmadapters_model.safetensors",
    ]
    saved = load_file(tmp_path / "ck" / "mmadapters_model.safetensors")
    assert any(".lora_A.default." in k for k in saved) and any(k.startswith("llm_adapters.") for k in saved)
    assert not any(k.endswith("base_layer.weight") for k in saved), "a backbone weight in the adapter file"
    reloaded = LavinForConditionalGeneration.from_pretrained(tmp_path / "ck")
    torch.testing.assert_close(logits(reloaded, batch), expected)
    # The LoRA changed the answer: the comparison above is not vacuous.
    reloaded.disable_adapters()
    assert not torch.allclose(logits(reloaded, batch), expected)
    reloaded.enable_adapters()
    torch.testing.assert_close(logits(reloaded, batch), expected)


def test_full_save_keeps_lora_layers(lavin, processor, tmp_path):
    add_lora(lavin, lora())
    randomize_trainable(lavin)
    batch = inputs(processor)
    expected = logits(lavin, batch)
    lavin.save_pretrained(tmp_path / "full", adapter_only=False)
    reloaded = LavinForConditionalGeneration.from_pretrained(tmp_path / "full")
    torch.testing.assert_close(logits(reloaded, batch), expected)


def test_named_adapters_switch_as_in_peft_and_the_active_ones_round_trip(lavin, processor, tmp_path):
    """Several named LoRAs on different modules: set_adapter / active_adapters behave as PEFT's (every layer takes
    the names, also where one of them has no layer), and a checkpoint reloads with the adapters that were active
    when it was saved (not with the last one recorded), so it computes what the saved model did."""
    lavin.add_adapter(lora(target_modules=["q_proj"]), adapter_name="a")
    lavin.add_adapter(lora(target_modules=["v_proj"]), adapter_name="b")
    randomize_trainable(lavin)
    batch = inputs(processor)
    assert lavin.active_adapters() == ["b"]  # as transformers: the adapter just added is the active one
    expected = {}
    for active in (["a"], ["b"], ["a", "b"]):
        lavin.set_adapter(active)
        assert lavin.active_adapters() == active
        expected[tuple(active)] = logits(lavin, batch)
    assert not torch.allclose(expected[("a",)], expected[("a", "b")])
    for active in (["a"], ["a", "b"]):
        lavin.set_adapter(active)
        lavin.save_pretrained(tmp_path / "-".join(active))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reloaded = LavinForConditionalGeneration.from_pretrained(tmp_path / "-".join(active))
        assert not [w for w in caught if "peft_config" in str(w.message)], "PEFT's multiple-adapters warning"
        assert reloaded.active_adapters() == active
        torch.testing.assert_close(logits(reloaded, batch), expected[tuple(active)])
        reloaded.set_adapter("b")
        torch.testing.assert_close(logits(reloaded, batch), expected[("b",)])
        # Which adapters train follows the active ones, as in PEFT.
        trains = {
            n.split(".lora_")[1].split(".")[1]
            for n, p in reloaded.named_parameters()
            if ".lora_" in n and p.requires_grad
        }
        assert trains == {"b"}


def test_delete_adapter_removes_layers_and_record(lavin):
    add_lora(lavin, lora())
    lavin.delete_adapter("default")
    assert lavin.config.peft_adapters is None
    assert not any(".lora_" in k for k in lavin.adapter_state_dict())


# --- PEFT's own entry points -------------------------------------------------------------------------------------


def test_plain_get_peft_model_with_a_scoped_regex_and_adoption(lavin, processor, tmp_path):
    # Documented PEFT arguments: a regex scopes target_modules to the LLM.
    peft_model = get_peft_model(lavin, lora(target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    assert lora_places(lavin) == ["language_model"]
    assert not any(p.requires_grad for p in lavin.llm_adapters.parameters()), "PEFT froze our adapters"
    model = mmadapters.adopt_peft_model(peft_model)
    assert model is lavin and all(p.requires_grad for p in lavin.llm_adapters.parameters())
    randomize_trainable(model)
    batch = inputs(processor)
    expected = logits(model, batch)
    torch.testing.assert_close(logits(peft_model, batch), expected)
    model.save_pretrained(tmp_path / "ck")
    torch.testing.assert_close(
        logits(LavinForConditionalGeneration.from_pretrained(tmp_path / "ck"), batch), expected
    )


def test_an_adopted_peft_models_own_save_keeps_our_trained_modules(lavin, processor, tmp_path):
    """After adoption our modules train beside the LoRA; PEFT's own save_pretrained would write the LoRA alone (the
    trained LaVIN adapters silently lost). The PeftModel saves as the model inside it does: both, one checkpoint."""
    peft_model = get_peft_model(lavin, lora(target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    mmadapters.adopt_peft_model(peft_model)
    randomize_trainable(peft_model)
    batch = inputs(processor)
    expected = logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "ck", processor=processor)
    assert "adapter_config.json" not in os.listdir(tmp_path / "ck")
    torch.testing.assert_close(
        logits(LavinForConditionalGeneration.from_pretrained(tmp_path / "ck"), batch), expected
    )
    with pytest.raises(TypeError, match="selected_adapters"):  # PEFT's save options: refused, nothing written
        peft_model.save_pretrained(tmp_path / "other", selected_adapters=["default"])
    assert not (tmp_path / "other").exists()
    planned = peft_model.push_to_hub("me/x", dry_run=True, allow_local_backbones=True, license="apache-2.0")
    assert {"mmadapters_model.safetensors", "README.md"} <= {f.path for f in planned}  # ours, with our card


def test_save_of_a_get_peft_model_model_without_adoption_keeps_the_lora(lavin, processor, tmp_path):
    peft_model = get_peft_model(lavin, lora())  # unscoped: the CLIP tower gets LoRA too, as PEFT does
    randomize_trainable(peft_model)
    batch = inputs(processor)
    expected = logits(peft_model, batch)
    peft_model.get_base_model().save_pretrained(tmp_path / "ck")
    reloaded = LavinForConditionalGeneration.from_pretrained(tmp_path / "ck")
    assert lora_places(reloaded) == ["language_model", "vision_tower"]
    torch.testing.assert_close(logits(reloaded, batch), expected)


def test_all_linear_lora_on_our_own_layers_counts_in_generate_and_in_the_merge(lavin, processor, tmp_path):
    """PEFT's target_modules="all-linear" wraps every linear layer, our adapters' down-projections and routers
    too (as it wraps LLaVA's projector). generate folds the LLM adapters for speed, and the merged export folds
    them into the LLM: both must count those LoRA layers as forward does."""
    peft_model = get_peft_model(lavin, lora(target_modules="all-linear", init_lora_weights=False))
    assert "llm_adapters" in lora_places(lavin)
    model = mmadapters.adopt_peft_model(peft_model)
    # The LoRA on our own layers is no backbone parameter (it was counted as a negative number of them).
    assert model.freeze_backbones() == 0
    randomize_trainable(model)  # our experts start at zero, which would hide what goes through `down`
    batch = inputs(processor)
    expected = logits(model, batch)[:, -1]
    with torch.no_grad():
        generated = model.generate(
            **batch, max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
    torch.testing.assert_close(generated.scores[0], expected, atol=1e-5, rtol=0)
    model.disable_adapters()  # the LoRA on our own layers too: generate's kept fold must not be the one above
    with torch.no_grad():
        generated = model.generate(
            **batch, max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
    torch.testing.assert_close(generated.scores[0], logits(model, batch)[:, -1], atol=1e-5, rtol=0)
    model.enable_adapters()

    model.save_pretrained(tmp_path / "ck")
    reloaded = LavinForConditionalGeneration.from_pretrained(tmp_path / "ck")
    torch.testing.assert_close(logits(reloaded, batch)[:, -1], expected)
    text = processor(text=["Image: N/A\nthe capital of"])
    text_logits = logits(reloaded, text)
    merged = merge_lavin_adapters(reloaded, "text")
    with torch.no_grad():
        merged_logits = merged(**text).logits
    torch.testing.assert_close(merged_logits, text_logits, atol=1e-5, rtol=0)


def test_generate_routes_with_the_peft_layers_as_they_are_after_every_switch(
    lavin, processor, tiny_backbones, tmp_path
):
    """LaVIN's learned routing runs the modality token through the LLM, PEFT layers and all; generate keeps the
    folded adapters across calls, keyed on our adapters' values. Switching the LLM's LoRA (set_adapter,
    disable_adapters, a hotswap, LoRA weights that trained) left that key as it was: generate then routed as with
    the previous LoRA, unlike forward. Each step: generate's first scores == forward's last logits."""
    for seed, name in ((1, "a"), (2, "b")):
        llm_lora = get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_backbones[0]), lora(lora_alpha=4 * seed)
        )
        randomize_trainable(llm_lora, seed=seed)
        llm_lora.save_pretrained(tmp_path / name)
    randomize_trainable(lavin)  # our adapters and routers, so that the routing table matters
    lavin.load_adapter(tmp_path / "a", adapter_name="a")
    lavin.load_adapter(tmp_path / "b", adapter_name="b")
    batch = inputs(processor)

    def generate_matches_forward():
        expected = logits(lavin, batch)[:, -1]
        with torch.no_grad():
            generated = lavin.generate(
                **batch, max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True
            )
        torch.testing.assert_close(generated.scores[0], expected, atol=1e-5, rtol=0)
        return expected

    lavin.set_adapter("a")
    with_a = generate_matches_forward()
    lavin.set_adapter("b")
    assert not torch.allclose(generate_matches_forward(), with_a)
    lavin.disable_adapters()
    generate_matches_forward()
    lavin.enable_adapters()
    lavin.load_adapter(tmp_path / "a", adapter_name="b", hotswap=True)
    generate_matches_forward()
    with torch.no_grad():  # the LoRA trained (our adapters did not)
        for name, parameter in lavin.named_parameters():
            if ".lora_B.b." in name:
                parameter.mul_(1.5)
    generate_matches_forward()


def test_generate_routes_with_a_lora_on_our_routers_as_it_is(tiny_backbones, processor):
    """A LoRA on our own routers (nothing in the LLM) changes the learned routing table; disabling it between two
    generate calls must change the kept fold (its values do not change, its state does)."""
    torch.manual_seed(0)
    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    peft_model = get_peft_model(
        model, lora(target_modules=r".*llm_adapters.*router", init_lora_weights=False)
    )
    mmadapters.adopt_peft_model(peft_model)
    randomize_trainable(model)
    batch = inputs(processor)
    for switch in (model.disable_adapters, model.enable_adapters):
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=1, do_sample=False)  # folds and keeps the fold
        switch()
        with torch.no_grad():
            generated = model.generate(
                **batch, max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True
            )
        torch.testing.assert_close(generated.scores[0], logits(model, batch)[:, -1], atol=1e-5, rtol=0)


def test_load_adapter_of_a_lora_trained_on_the_bare_llm(lavin, tiny_backbones, processor, tmp_path):
    llm = AutoModelForCausalLM.from_pretrained(tiny_backbones[0])
    peft_llm = get_peft_model(llm, lora())
    randomize_trainable(peft_llm)
    peft_llm.save_pretrained(tmp_path / "llm-lora")
    lavin.load_adapter(tmp_path / "llm-lora")
    assert lora_places(lavin) == ["language_model"]
    state = lavin.get_adapter_state_dict("default")
    a_key = next(k for k in state if ".lora_A." in k)
    peft_key = "base_model.model." + a_key.removeprefix("language_model.")  # PEFT's form, as saved
    torch.testing.assert_close(
        state[a_key], load_file(tmp_path / "llm-lora" / "adapter_model.safetensors")[peft_key]
    )
    # The same adapter from PEFT's state dict and config (transformers' load_adapter takes them too).
    lavin.load_adapter(
        adapter_state_dict=get_peft_model_state_dict(peft_llm),
        peft_config=peft_llm.peft_config["default"],
        adapter_name="from_state",
    )
    from_state = lavin.get_adapter_state_dict("from_state")
    assert from_state.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(from_state[key], value, msg=key)
    lavin.delete_adapter("from_state")
    # Saved with our adapters and reloaded identically.
    batch = inputs(processor)
    expected = logits(lavin, batch)
    lavin.save_pretrained(tmp_path / "ck")
    torch.testing.assert_close(
        logits(LavinForConditionalGeneration.from_pretrained(tmp_path / "ck"), batch), expected
    )


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_peft_from_pretrained_with_an_adapter_of_the_bare_llm_is_refused_with_the_way_that_works(
    lavin, tiny_backbones, processor, tmp_path, low_cpu_mem_usage
):
    """`PeftModel.from_pretrained(model, folder)` with a LoRA trained on the bare LLM: PEFT looked for tensors named
    after the bare LLM (`model.layers.0...`) in the whole model, only warned "Found missing adapter keys" and left
    the new LoRA at its start (B = 0: the adapter silently did nothing). Refused, naming `load_adapter`; the model
    computes as before. An adapter trained on the model itself (`get_peft_model`) still loads that way."""
    peft_llm = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_backbones[0]), lora())
    randomize_trainable(peft_llm)
    peft_llm.save_pretrained(tmp_path / "llm-lora")
    batch = inputs(processor)
    before = logits(lavin, batch)
    with pytest.raises(PeftOnTopError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora_A.*load_adapter"):
        PeftModel.from_pretrained(lavin, tmp_path / "llm-lora", low_cpu_mem_usage=low_cpu_mem_usage)
    torch.testing.assert_close(logits(lavin, batch), before)

    torch.manual_seed(0)
    own = get_peft_model(LavinForConditionalGeneration.from_backbones(*tiny_backbones), lora())
    randomize_trainable(own)
    own.save_pretrained(tmp_path / "lavin-lora")
    torch.manual_seed(0)
    fresh = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "lavin-lora", low_cpu_mem_usage=low_cpu_mem_usage)
    torch.testing.assert_close(logits(reloaded.eval(), batch), logits(own.eval(), batch))


def test_adapter_files_with_a_copy_of_the_llms_embeddings_load_when_it_is_the_backbones(
    lavin, tiny_backbones, processor, tmp_path
):
    """PEFT writes the embedding matrices into the adapter file when the LoRA targets `embed_tokens` / `lm_head`
    (`save_embedding_layers="auto"`, PEFT's default). Such a file was refused as "trained on another base model".
    A copy equal to the backbone's weights is dropped (the backbones stay frozen); a different one (a resized
    vocabulary, another base) is refused by name, and the model is left as it was."""
    peft_llm = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_backbones[0]),
        lora(target_modules=["embed_tokens", "q_proj"]),
    )
    randomize_trainable(peft_llm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Setting `save_embedding_layers` to `True` ..."
        peft_llm.save_pretrained(tmp_path / "with-embeddings")
    saved = load_file(tmp_path / "with-embeddings" / "adapter_model.safetensors")
    embedding_key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert embedding_key in saved
    peft_llm.save_pretrained(tmp_path / "plain", save_embedding_layers=False)
    torch.manual_seed(0)  # as the `lavin` fixture
    reference = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    reference.load_adapter(tmp_path / "plain")
    batch = inputs(processor)
    lavin.load_adapter(tmp_path / "with-embeddings")
    torch.testing.assert_close(logits(lavin, batch), logits(reference, batch))

    changed = dict(saved)
    changed[embedding_key] = saved[embedding_key] + 1.0
    os.makedirs(tmp_path / "resized")
    shutil.copy(tmp_path / "plain" / "adapter_config.json", tmp_path / "resized")
    save_file(changed, tmp_path / "resized" / "adapter_model.safetensors")
    before = logits(lavin, batch)
    with pytest.raises(
        PeftOnTopError, match=r"model.embed_tokens.base_layer.weight .* differs from this backbone"
    ):
        lavin.load_adapter(tmp_path / "resized", adapter_name="resized")
    assert list(lavin.config.peft_adapters) == ["default"]
    torch.testing.assert_close(logits(lavin, batch), before)


def test_load_adapter_takes_transformers_keywords_or_refuses_them(lavin, tiny_backbones, tmp_path):
    """`local_files_only` and adapter_kwargs' `subfolder` (one of several adapters in a folder) as in transformers;
    `low_cpu_mem_usage=True` and unknown keywords are refused, not dropped, and nothing is loaded."""
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_backbones[0]), lora()).save_pretrained(
        tmp_path / "runs" / "style"
    )
    lavin.load_adapter(tmp_path / "runs", adapter_kwargs={"subfolder": "style"}, local_files_only=True)
    assert list(lavin.config.peft_adapters) == ["default"]
    for keywords, message in (
        ({"low_cpu_mem_usage": True}, "low_cpu_mem_usage=True. is not supported"),
        ({"adapter_kwargs": {"proxies": {}}}, r"adapter_kwargs \['proxies'\]"),
        ({"device_map": "auto"}, r"keyword argument\(s\) \['device_map'\]"),
    ):
        with pytest.raises(TypeError, match=message):
            lavin.load_adapter(tmp_path / "runs" / "style", adapter_name="other", **keywords)
    assert list(lavin.config.peft_adapters) == ["default"]


def peft_method_config(method: str, target_modules):
    """A PEFT config of `method` on `target_modules` (the attention projections; the input norms for LN tuning)."""
    import peft

    if method == "ln_tuning":
        norms = (
            "input_layernorm" if isinstance(target_modules, list) else r".*language_model.*input_layernorm"
        )
        return peft.LNTuningConfig(target_modules=[norms] if isinstance(target_modules, list) else norms)
    return {
        "lora": lambda: lora(target_modules=target_modules),
        "dora": lambda: lora(target_modules=target_modules, use_dora=True),
        "loha": lambda: peft.LoHaConfig(r=4, target_modules=target_modules),
        "lokr": lambda: peft.LoKrConfig(r=4, target_modules=target_modules),
        "ia3": lambda: peft.IA3Config(target_modules=target_modules, feedforward_modules=[]),
        "oft": lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=target_modules),
        "boft": lambda: peft.BOFTConfig(boft_block_size=8, target_modules=target_modules),
        "hra": lambda: peft.HRAConfig(r=4, target_modules=target_modules),
        "fourierft": lambda: peft.FourierFTConfig(n_frequency=16, target_modules=target_modules),
        "adalora": lambda: peft.AdaLoraConfig(init_r=4, target_modules=target_modules, total_step=10),
    }[method]()


@pytest.mark.parametrize(
    "method",
    ["lora", "dora", "loha", "lokr", "ia3", "oft", "boft", "hra", "fourierft", "adalora", "ln_tuning"],
)
def test_peft_adapter_files_of_every_injecting_method_load(
    lavin, tiny_backbones, processor, tmp_path, method
):
    """What `PeftModel.save_pretrained` wrote loads, trained on the bare LLM (load_adapter: each adapted layer
    computes what PEFT's does) and on one of our checkpoints (from_pretrained of the adapter folder: the logits of
    the PeftModel). PEFT saves some tensors under other names than its layers hold them (DoRA's magnitude vector)
    and leaves some out (AdaLoRA's `ranknum`, rebuilt from the config): our loader matched names itself and
    refused both ("does not fit this model's modules"); PEFT's own loader puts them in place now."""

    def config(**overrides):
        return peft_method_config(method, overrides.get("target_modules", ["q_proj", "v_proj"]))

    peft_llm = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_backbones[0]), config())
    randomize_trainable(peft_llm)
    peft_llm.save_pretrained(tmp_path / "llm-adapter")
    lavin.load_adapter(tmp_path / "llm-adapter")
    theirs = {name.removeprefix("base_model.model."): layer for name, layer in tuner_layers(peft_llm.eval())}
    ours = dict(tuner_layers(lavin.eval().language_model))
    assert sorted(ours) == sorted(theirs)
    with torch.no_grad():
        for name, layer in ours.items():
            base_layer = layer.get_base_layer()
            width = getattr(base_layer, "in_features", None) or base_layer.weight.shape[-1]
            x = torch.randn(2, 3, width)
            torch.testing.assert_close(layer(x), theirs[name](x), msg=name)
    batch = inputs(processor)
    expected = logits(lavin, batch)
    lavin.save_pretrained(tmp_path / "ck")  # and in our own checkpoints, with our adapters
    torch.testing.assert_close(
        logits(LavinForConditionalGeneration.from_pretrained(tmp_path / "ck"), batch), expected
    )

    torch.manual_seed(0)
    LavinForConditionalGeneration.from_backbones(*tiny_backbones).save_pretrained(tmp_path / "lavin")
    base = LavinForConditionalGeneration.from_pretrained(tmp_path / "lavin")
    peft_model = get_peft_model(base, config(target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    randomize_trainable(peft_model)
    peft_model.save_pretrained(tmp_path / "on-lavin")
    torch.testing.assert_close(
        logits(AutoModelForImageTextToText.from_pretrained(tmp_path / "on-lavin"), batch),
        logits(peft_model, batch),
    )


def test_load_adapter_of_a_lora_trained_on_lavin_goes_back_where_it_was(
    lavin, tiny_backbones, processor, tmp_path
):
    peft_model = get_peft_model(lavin, lora())
    randomize_trainable(peft_model)
    batch = inputs(processor)
    expected = logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "peft")
    torch.manual_seed(0)
    fresh = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    fresh.load_state_dict(
        {k: v for k, v in peft_model.get_base_model().adapter_state_dict().items() if ".lora_" not in k},
        strict=False,
    )
    fresh.load_adapter(tmp_path / "peft")
    assert lora_places(fresh) == ["language_model", "vision_tower"]
    torch.testing.assert_close(logits(fresh, batch), expected)
    with pytest.raises(PeftOnTopError, match="drop on='vision_tower'"):
        LavinForConditionalGeneration.from_backbones(*tiny_backbones).load_adapter(
            tmp_path / "peft", on="vision_tower"
        )


def test_a_merge_is_saved_in_full_or_refused(lavin, processor, tmp_path):
    peft_model = get_peft_model(lavin, lora())
    randomize_trainable(peft_model)
    batch = inputs(processor)
    expected = logits(peft_model, batch)
    merged = peft_model.merge_and_unload()
    assert merged is lavin and not tuner_layers(merged)
    # BackboneChangedError is a PeftOnTopError too (what this refusal raised before it had its own class).
    with pytest.raises(PeftOnTopError, match=r"adapter_only=False") as refused:
        merged.save_pretrained(tmp_path / "adapters")
    assert isinstance(refused.value, BackboneChangedError)
    assert not (tmp_path / "adapters").exists()
    merged.save_pretrained(tmp_path / "full", adapter_only=False)
    reloaded = LavinForConditionalGeneration.from_pretrained(tmp_path / "full")
    torch.testing.assert_close(logits(reloaded, batch), expected, rtol=1e-5, atol=1e-5)


def test_a_trained_backbone_is_never_dropped_by_an_adapter_only_save(lavin, tiny_backbones, tmp_path):
    # A dtype cast is not a change, nor a cast to half precision and back (the values are rounded; a reload reads
    # them unrounded).
    for half in (torch.bfloat16, torch.float16):
        cast = LavinForConditionalGeneration.from_backbones(*tiny_backbones).to(half)
        cast.save_pretrained(tmp_path / f"{half}")
        cast.float().save_pretrained(tmp_path / f"{half}-and-back")
    # A change made in half precision is still one.
    with torch.no_grad():
        cast.half().language_model.model.layers[0].mlp.up_proj.weight.add_(0.01)
    with pytest.raises(BackboneChangedError, match="backbone weights changed"):
        cast.float().save_pretrained(tmp_path / "changed-in-fp16")
    with torch.no_grad():
        lavin.language_model.model.layers[0].mlp.up_proj.weight.add_(0.01)
    with pytest.raises(BackboneChangedError, match="backbone weights changed"):
        lavin.save_pretrained(tmp_path / "ck")


# --- file names: ours and PEFT's never collide -------------------------------------------------------------------


def test_peft_and_our_checkpoints_share_a_folder_and_each_loader_says_what_it_got(
    lavin, tiny_backbones, processor, tmp_path
):
    add_lora(lavin, lora())
    randomize_trainable(lavin)
    batch = inputs(processor)
    expected = logits(lavin, batch)
    folder = tmp_path / "ck"
    lavin.save_pretrained(folder)
    # A PEFT save into our folder writes PEFT's file names, next to ours.
    peft_model = get_peft_model(LavinForConditionalGeneration.from_backbones(*tiny_backbones), lora(r=2))
    peft_model.save_pretrained(folder)
    assert {"adapter_config.json", "mmadapters_model.safetensors"} <= set(os.listdir(folder))
    # Loaded as transformers loads a model with a PEFT adapter beside it: both; here under one name, said up front.
    with pytest.raises(LoadingOptionError, match="holds a PEFT adapter named 'default'.*adapter_name="):
        LavinForConditionalGeneration.from_pretrained(folder)
    both = LavinForConditionalGeneration.from_pretrained(folder, adapter_name="beside")
    assert set(both.config.peft_adapters) == {"default", "beside"}
    both.set_adapter("default")
    torch.testing.assert_close(logits(both, batch), expected)
    # Our save into that folder keeps PEFT's adapter.
    lavin.save_pretrained(folder)
    assert PeftConfig.from_pretrained(folder).r == 2
    # Our loader on a PEFT-only folder, and PEFT's on ours: clear errors.
    llm = AutoModelForCausalLM.from_pretrained(lavin.config.text_backbone["name_or_path"])
    get_peft_model(llm, lora()).save_pretrained(tmp_path / "peft-only")
    with pytest.raises(
        ValueError, match="is a PEFT adapter .LORA., not an mmadapters checkpoint.*load_adapter"
    ):
        LavinForConditionalGeneration.from_pretrained(tmp_path / "peft-only")
    lavin.save_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match="adapter_config.json"):
        PeftModel.from_pretrained(llm, tmp_path / "ours")
    with pytest.raises(PeftOnTopError, match="not a PEFT adapter"):
        lavin.load_adapter(tmp_path / "ours", adapter_name="y")


@pytest.mark.parametrize("adapter_only", [True, False])
def test_a_peft_adapter_trained_on_our_checkpoint_loads_as_transformers_loads_one(
    lavin, processor, tmp_path, adapter_only
):
    """`get_peft_model` on a loaded checkpoint, `PeftModel.save_pretrained`: PEFT records the checkpoint as the base
    model (our loader left `name_or_path` empty, so it recorded none), and the adapter folder loads with its base
    through transformers' Auto class, a pipeline, our own `from_pretrained` and PEFT's AutoPeftModel (the Auto
    class and the pipeline dropped the LoRA of a full checkpoint without a word)."""
    from peft import AutoPeftModel
    from transformers import pipeline

    randomize_trainable(lavin)
    checkpoint = str(tmp_path / "lavin")
    lavin.save_pretrained(checkpoint, adapter_only=adapter_only)
    processor.save_pretrained(checkpoint)
    base = LavinForConditionalGeneration.from_pretrained(checkpoint)
    assert base.name_or_path == checkpoint
    peft_model = get_peft_model(
        base, lora(target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "lora")
    assert PeftConfig.from_pretrained(tmp_path / "lora").base_model_name_or_path == checkpoint
    batch = inputs(processor)
    expected = logits(peft_model, batch)
    assert (
        expected - logits(LavinForConditionalGeneration.from_pretrained(checkpoint), batch)
    ).abs().max() > 1e-3
    # PEFT 0.19+ imports the base model's module only when allowed (0.18 has no such keyword).
    allowlist = "import_allowlist" in inspect.signature(AutoPeftModel.from_pretrained).parameters
    allow = {"import_allowlist": [type(lavin).__module__]} if allowlist else {}
    for load in (
        lambda: AutoModelForImageTextToText.from_pretrained(tmp_path / "lora"),
        lambda: pipeline("image-text-to-text", model=str(tmp_path / "lora")).model,
        lambda: LavinForConditionalGeneration.from_pretrained(tmp_path / "lora"),
        lambda: AutoPeftModel.from_pretrained(tmp_path / "lora", **allow),
    ):
        torch.testing.assert_close(logits(load(), batch), expected)
    loaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "lora", output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    torch.testing.assert_close(logits(loaded, batch), expected)
    named = AutoModelForImageTextToText.from_pretrained(tmp_path / "lora", adapter_name="task")
    assert named.active_adapters() == ["task"]
    torch.testing.assert_close(logits(named, batch), expected)
    # In a subfolder (as a Hub repo holds one of several adapters): the adapter is read from there.
    shutil.copytree(tmp_path / "lora", tmp_path / "runs" / "lora")
    in_subfolder = LavinForConditionalGeneration.from_pretrained(tmp_path / "runs", subfolder="lora")
    torch.testing.assert_close(logits(in_subfolder, batch), expected)
    with pytest.raises(LoadingOptionError, match="adapter_name='task' names the PEFT adapter"):
        LavinForConditionalGeneration.from_pretrained(checkpoint, adapter_name="task")
    with pytest.raises(LoadingOptionError, match=r"adapter_kwargs \['proxies'\] are not supported"):
        AutoModelForImageTextToText.from_pretrained(tmp_path / "lora", adapter_kwargs={"proxies": {}})


def test_checkpoints_with_peft_file_names_still_load(lavin, processor, tmp_path):
    """Checkpoints written before the rename (adapter_model.safetensors + adapter_config.json) load as before."""
    import json

    batch = inputs(processor)
    randomize_trainable(lavin)
    expected = logits(lavin, batch)
    lavin.save_pretrained(tmp_path / "old")
    os.rename(
        tmp_path / "old" / "mmadapters_model.safetensors", tmp_path / "old" / "adapter_model.safetensors"
    )
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps({**lavin.config.adapter_config}))
    torch.testing.assert_close(
        logits(LavinForConditionalGeneration.from_pretrained(tmp_path / "old"), batch), expected
    )
    # transformers' Auto class takes any adapter_config.json for a PEFT adapter's and passes it on: ours is not.
    torch.testing.assert_close(
        logits(AutoModelForImageTextToText.from_pretrained(tmp_path / "old"), batch), expected
    )
    # Saving again writes the new names and removes the old ones.
    LavinForConditionalGeneration.from_pretrained(tmp_path / "old").save_pretrained(tmp_path / "old")
    assert sorted(os.listdir(tmp_path / "old")) == [
        "config.json",
        "generation_config.json",
        "mmadapters_loader.py",
        "mmadapters_model.safetensors",
    ]


# --- Trainers --------------------------------------------------------------------------------------------------


def adapter_weights(model):
    return {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}


def test_lavin_trainer_takes_a_peft_model_saves_everything_and_resumes_identically(
    tiny_backbones, processor, tmp_path
):
    dataset = toy_dataset(tmp_path)
    torch.manual_seed(0)
    peft_model = get_peft_model(
        LavinForConditionalGeneration.from_backbones(*tiny_backbones),
        lora(target_modules=r".*language_model.*q_proj"),
    )
    trainer = make_trainer(peft_model, processor, dataset, tmp_path / "full")
    model = trainer.model
    assert isinstance(model, LavinForConditionalGeneration)
    before = adapter_weights(model)
    trainer.train()
    after = adapter_weights(model)
    changed = {k.split(".", 1)[0] for k in before if not torch.equal(before[k], after[k])}
    assert {
        "llm_adapters",
        "projector",
        "language_model",
    } <= changed  # LoRA (in the LLM) and ours both trained
    assert any(name.startswith("router/") for entry in trainer.state.log_history for name in entry)
    saved = load_file(tmp_path / "full" / "checkpoint-6" / "mmadapters_model.safetensors")
    assert set(saved) == set(after)
    reloaded = LavinForConditionalGeneration.from_pretrained(tmp_path / "full" / "checkpoint-6")
    for name, tensor in adapter_weights(reloaded).items():
        torch.testing.assert_close(tensor, after[name], msg=name)

    # Kill after checkpoint-3 and resume in a fresh process-like setting: the same weights as uninterrupted.
    torch.manual_seed(123)
    again = get_peft_model(
        LavinForConditionalGeneration.from_backbones(*tiny_backbones),
        lora(target_modules=r".*language_model.*q_proj"),
    )
    resumed = make_trainer(again, processor, dataset, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    for name, tensor in adapter_weights(resumed.model).items():
        torch.testing.assert_close(tensor, after[name], rtol=1e-5, atol=1e-6, msg=name)


def test_crome_trainer_takes_a_peft_model_and_keeps_its_stage(tmp_path):
    llm, vision = save_tiny_llm(tmp_path / "llm"), save_tiny_vision(tmp_path / "vision")
    model = CromeForConditionalGeneration.from_backbones(
        llm, vision, qformer=tiny_qformer_config(), num_query_tokens=4
    )
    processor = CromeProcessor.from_backbones(llm, vision, num_image_tokens=model.config.num_image_tokens)
    dataset = toy_dataset(tmp_path, n=8).map(lambda row: {"prompt": row["prompt"].replace("Image: ", "")})
    peft_model = get_peft_model(model, lora(target_modules=r".*language_model.*(q_proj|v_proj)"))
    trainer = make_trainer(
        peft_model,
        processor,
        dataset,
        tmp_path / "crome",
        max_steps=2,
        trainer_class=CromeTrainer,
        stage="finetune",
    )
    before = adapter_weights(model)
    trainer.train()
    after = adapter_weights(model)
    changed = {k.split(".", 1)[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"adapter", "language_model"}  # finetune trains the CROME adapter; LoRA in the LLM
    reloaded = CromeForConditionalGeneration.from_pretrained(tmp_path / "crome" / "checkpoint-2")
    for name, tensor in adapter_weights(reloaded).items():
        torch.testing.assert_close(tensor, after[name], msg=name)


def test_readme_lora_on_top_example_runs(tiny_backbones, tmp_path, monkeypatch):
    """The README's "LoRA on top" code, executed with the Hub ids pointed at tiny local backbones."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### LoRA on top", 1)[1].split("\n### ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    llm = AutoModelForCausalLM.from_pretrained(tiny_backbones[0])
    get_peft_model(llm, lora()).save_pretrained(tmp_path / "chat-lora")
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_backbones[0]), lora(r=2)).save_pretrained(
        tmp_path / "code-lora"
    )
    for hub_id, local in (
        ("meta-llama/Llama-2-7b-hf", tiny_backbones[0]),
        ("openai/clip-vit-large-patch14", tiny_backbones[1]),
        ("you/llama-2-7b-chat-lora", str(tmp_path / "chat-lora")),
        ("you/llama-2-7b-code-lora", str(tmp_path / "code-lora")),
    ):
        assert hub_id in code
        code = code.replace(f'"{hub_id}"', repr(local))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    model = namespace["model"]
    assert lora_places(model) == ["language_model"]
    assert sorted(model.config.peft_adapters) == ["chat", "default"] and model.active_adapters() == ["chat"]
    assert (tmp_path / "lavin-lora" / "mmadapters_model.safetensors").is_file()
    served = namespace["served"]  # rank 2 swapped into layers padded to 16, the saved record says so
    assert {p.shape[0] for n, p in served.named_parameters() if ".lora_A." in n} == {16}
    assert served.config.peft_adapters["default"]["config"]["r"] == 16


def lavin_lite(tiny_backbones, tmp_path):
    """LaVIN-lite at tiny size (the LLM in 4-bit nf4; bitsandbytes' CPU kernels need a width of 64) and its
    processor."""
    from conftest import save_llm_with_width
    from transformers import BitsAndBytesConfig

    text_path = save_llm_with_width(tmp_path / "llm64")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    torch.manual_seed(0)
    model = LavinForConditionalGeneration.from_backbones(
        text_path, tiny_backbones[1], quantization_config={"text_config": quantization}
    )
    return model, LavinProcessor.from_backbones(text_path, tiny_backbones[1])


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_lora_on_a_4bit_llm_trains_and_round_trips(tiny_backbones, tmp_path):
    """QLoRA-style: LaVIN-lite (the LLM in 4-bit nf4) with a LoRA on top; the LoRA and our adapters train, the
    checkpoint quantises the LLM again and rebuilds the LoRA."""
    model, processor = lavin_lite(tiny_backbones, tmp_path)
    add_lora(model, lora())
    assert (
        type(model.language_model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    )  # PEFT's bnb LoRA
    batch = processor(text=["Image: N/A\nthe capital of"], answers=["paris"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert any(torch.count_nonzero(p) for n, p in model.named_parameters() if ".lora_B." in n)
    model.eval().save_pretrained(tmp_path / "qlora")
    loaded = LavinForConditionalGeneration.from_pretrained(tmp_path / "qlora")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_peft_kbit_preparation_then_training_with_checkpointing_trains_lora_and_our_adapters(
    tiny_backbones, tmp_path
):
    """The QLoRA recipe as PEFT users write it (README, "QLoRA with PEFT's helper"): prepare_model_for_kbit_training
    and get_peft_model on LaVIN-lite, then our Trainer. PEFT reads `is_loaded_in_4bit` on the model it is given,
    which ours lacked (its LLM alone had it): the helper left activation checkpointing off and get_peft_model
    wrapped the 4-bit layers with a plain LoRA (which cannot be merged into them). Now PEFT's 4-bit LoRA, with
    checkpointing on (and no deprecation warning), and the LoRA and LaVIN's own adapters train through the 4-bit
    LLM."""
    import warnings

    from peft import prepare_model_for_kbit_training
    from peft.tuners.lora.bnb import Linear4bit as Lora4bit

    model, processor = lavin_lite(tiny_backbones, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = prepare_model_for_kbit_training(model)
    assert model.is_gradient_checkpointing
    assert not any(p.requires_grad for p in model.parameters())  # PEFT froze everything, ours included
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    assert isinstance(model.language_model.model.layers[0].self_attn.q_proj, Lora4bit)
    before = {
        n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_B" in n or "expert" in n
    }
    trainer = make_trainer(
        peft_model,
        processor,
        toy_dataset(tmp_path),
        tmp_path / "out",
        max_steps=2,
        training={"save_strategy": "no"},
    )
    trained = trainer.model
    trainer.train()
    assert trained.is_gradient_checkpointing
    after = dict(trained.named_parameters())
    changed = {n for n, p in before.items() if not torch.equal(after[n.removeprefix("base_model.model.")], p)}
    assert any("lora_B" in n for n in changed) and any("llm_adapters" in n and "expert" in n for n in changed)


def test_is_gradient_checkpointing_answers_without_a_deprecation_warning(lavin):
    """PEFT's get_peft_model reads `is_gradient_checkpointing` and TRL (DPO's reference pass, GRPO's and RLOO's
    generation) calls `gradient_checkpointing_disable`, names transformers 5.24 deprecated: our models answer them
    quietly, and correctly."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lavin.is_gradient_checkpointing is False
        for module in lavin.language_model.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = True
        assert lavin.is_gradient_checkpointing is True
        lavin.gradient_checkpointing_disable()
        assert lavin.is_gradient_checkpointing is False
        lavin.gradient_checkpointing_enable()
        assert lavin.is_gradient_checkpointing is True
        if hasattr(lavin, "activation_checkpointing_disable"):  # transformers >= 5.24
            lavin.activation_checkpointing_disable()
            assert lavin.is_gradient_checkpointing is False


def test_a_peft_model_as_a_backbone_is_refused_with_the_way_to_bring_its_adapter(tiny_backbones, tmp_path):
    """A PeftModel passed as the LLM stopped in os.fspath ("expected str, bytes or os.PathLike object"); the LLM
    inside it, PEFT layers and all, was taken in silently (frozen, left out of the record) and the first save was
    refused. Both are refused up front, naming load_adapter (the adapter then trains and saves with ours)."""
    peft_llm = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_backbones[0]), lora())
    peft_llm.save_pretrained(tmp_path / "llm-lora")
    for backbone in (peft_llm, peft_llm.get_base_model()):
        with pytest.raises(PeftOnTopError, match=r"PEFT .* model.load_adapter\("):
            LavinForConditionalGeneration.from_backbones(backbone, tiny_backbones[1])
    assert all(p.requires_grad for n, p in peft_llm.named_parameters() if "lora_" in n), "left as it was"
    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    model.load_adapter(tmp_path / "llm-lora")  # the way the message names
    assert model.config.peft_adapters
