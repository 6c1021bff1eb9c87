"""Hotswapping LoRA adapters (transformers' `load_adapter(..., hotswap=True)` and `enable_peft_hotswap`): the new
adapter's weights and scalings go into the loaded adapter's tensors, a compiled model does not recompile, and a
checkpoint saved afterwards reloads to the same outputs."""

from __future__ import annotations

import pytest
import torch
from conftest import save_bare_llm_lora, tiny_qformer_config, tiny_sample_inputs
from peft import LoraConfig, get_peft_model

from mmadapters import (
    CromeForConditionalGeneration,
    CromeProcessor,
    LavinForConditionalGeneration,
    LavinProcessor,
    PeftOnTopError,
)


def build(backbones, kind: str):
    torch.manual_seed(0)
    llm, vision = backbones["llama"], backbones["vision"]
    if kind == "lavin":
        return LavinForConditionalGeneration.from_backbones(llm, vision), LavinProcessor.from_backbones(
            llm, vision
        )
    model = CromeForConditionalGeneration.from_backbones(
        llm, vision, qformer=tiny_qformer_config(), num_query_tokens=4
    )
    return model, CromeProcessor.from_backbones(llm, vision, num_image_tokens=model.config.num_image_tokens)


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def assert_reloads_to(model, batch, expected, folder):
    model.save_pretrained(folder)
    torch.testing.assert_close(logits(type(model).from_pretrained(folder), batch), expected)


def lora_tensors(model):
    return {name: parameter for name, parameter in model.named_parameters() if ".lora_" in name}


@pytest.fixture(scope="module")
def loras(backbones_by_llm, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {
        "a": save_bare_llm_lora(backbones_by_llm["llama"], root / "a", seed=1),
        "b": save_bare_llm_lora(
            backbones_by_llm["llama"], root / "b", seed=2, lora_alpha=16
        ),  # same rank, another alpha
        "low": save_bare_llm_lora(backbones_by_llm["llama"], root / "low", seed=3, r=2, lora_alpha=3),
        "high": save_bare_llm_lora(
            backbones_by_llm["llama"], root / "high", seed=4, r=8, lora_alpha=8, use_rslora=True
        ),
    }


def fresh_load(backbones, kind, path, batch):
    model, _ = build(backbones, kind)
    model.load_adapter(path)
    return logits(model, batch)


@pytest.mark.parametrize("kind", ["lavin", "crome"])
def test_hotswap_puts_another_lora_into_the_same_tensors_and_computes_what_a_fresh_load_does(
    backbones_by_llm, loras, kind, tmp_path
):
    model, processor = build(backbones_by_llm, kind)
    batch = tiny_sample_inputs(processor)
    model.load_adapter(loras["a"])
    with_a = logits(model, batch)
    tensors = lora_tensors(model)
    model.load_adapter(loras["b"], adapter_name="default", hotswap=True)
    assert lora_tensors(model) == tensors, "the same parameter objects"
    expected = fresh_load(backbones_by_llm, kind, loras["b"], batch)
    assert not torch.allclose(expected, with_a)
    torch.testing.assert_close(logits(model, batch), expected)  # B's weights with B's alpha (16 / 4)
    assert model.config.peft_adapters["default"]["config"]["lora_alpha"] == 16
    # a lower rank fits (zero-padded), and the checkpoint saved afterwards says rank 4 with alpha 6 (3 / 2 * 4)
    model.load_adapter(loras["low"], adapter_name="default", hotswap=True)
    expected = fresh_load(backbones_by_llm, kind, loras["low"], batch)
    torch.testing.assert_close(logits(model, batch), expected)
    assert {k: model.config.peft_adapters["default"]["config"][k] for k in ("r", "lora_alpha")} == {
        "r": 4,
        "lora_alpha": 6,
    }
    assert_reloads_to(model, batch, expected, tmp_path / "ck")


def test_enable_peft_hotswap_pads_so_a_compiled_model_swaps_any_rank_without_recompiling(
    backbones_by_llm, loras, tmp_path
):
    model, processor = build(backbones_by_llm, "lavin")
    batch = tiny_sample_inputs(processor)
    model.enable_peft_hotswap(target_rank=8)
    model.load_adapter(loras["a"])  # rank 4, padded to 8: computes what it did
    assert {t.shape[0] for n, t in lora_tensors(model).items() if "lora_A" in n} == {8}
    torch.testing.assert_close(logits(model, batch), fresh_load(backbones_by_llm, "lavin", loras["a"], batch))

    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(**batch)
    for name in ("low", "high", "b"):  # ranks 2, 8 (rsLoRA), 4; alphas 3, 8, 16
        model.load_adapter(loras[name])  # hotswap="auto": the name "default" is loaded
        expected = fresh_load(backbones_by_llm, "lavin", loras[name], batch)
        with torch.compiler.set_stance("fail_on_recompile"), torch.no_grad():
            torch.testing.assert_close(compiled(**batch).logits, expected)
    assert list(model.config.peft_adapters) == ["default"]
    assert_reloads_to(model, batch, expected, tmp_path / "ck")


def test_a_hotswapped_adapter_trains_and_what_it_learned_reloads(backbones_by_llm, loras, tmp_path):
    model, processor = build(backbones_by_llm, "lavin")
    batch = tiny_sample_inputs(processor)
    model.enable_peft_hotswap(target_rank=8)
    model.load_adapter(loras["a"])
    model.load_adapter(loras["low"], is_trainable=True)
    swapped_in = {n: p.detach().clone() for n, p in lora_tensors(model).items()}
    assert swapped_in and all(p.requires_grad for p in lora_tensors(model).values())
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not all(torch.equal(p, swapped_in[n]) for n, p in lora_tensors(model).items()), "the LoRA trained"
    assert_reloads_to(model, batch, logits(model, batch), tmp_path / "ck")


def test_hotswap_refusals_say_why_and_change_nothing(backbones_by_llm, loras, tmp_path):
    model, processor = build(backbones_by_llm, "lavin")
    batch = tiny_sample_inputs(processor)
    with pytest.raises(PeftOnTopError, match="there must already be an existing adapter with the same"):
        model.load_adapter(loras["a"], hotswap=True)
    assert not model.config.peft_adapters
    model.load_adapter(loras["a"])
    expected, record = logits(model, batch), dict(model.config.peft_adapters)
    other_targets = save_bare_llm_lora(
        backbones_by_llm["llama"], tmp_path / "k", seed=5, target_modules=["k_proj", "v_proj"]
    )
    dropout = save_bare_llm_lora(backbones_by_llm["llama"], tmp_path / "d", seed=6, lora_dropout=0.1)
    for path, message in (
        (loras["high"], r"lora_A.weight is \(8, 32\), the layer holds \(4, 32\).*enable_peft_hotswap"),
        (other_targets, "adapts other layers than 'default'"),
        (dropout, r"differ in \['lora_dropout'\]"),
    ):
        with pytest.raises(PeftOnTopError, match=message):
            model.load_adapter(path, adapter_name="default", hotswap=True)
        torch.testing.assert_close(logits(model, batch), expected)
        assert model.config.peft_adapters == record
    with pytest.raises(ValueError, match="hotswap is True, False or 'auto'"):
        model.load_adapter(loras["b"], hotswap="yes")
    # transformers' rule: enable before the first adapter ("warn" / "ignore" go on)
    with pytest.raises(RuntimeError, match="before loading the first adapter"):
        model.enable_peft_hotswap(target_rank=8)
    with pytest.raises(ValueError, match="check_compiled should be one of"):
        model.enable_peft_hotswap(target_rank=8, check_compiled="never")
    model.enable_peft_hotswap(target_rank=8, check_compiled="ignore")
    model.load_adapter(loras["b"])  # "auto" now swaps into the same-rank "default"
    torch.testing.assert_close(logits(model, batch), fresh_load(backbones_by_llm, "lavin", loras["b"], batch))


def test_a_lora_above_the_target_rank_is_refused_before_it_loads(backbones_by_llm, loras):
    model, _ = build(backbones_by_llm, "lavin")
    model.enable_peft_hotswap(target_rank=2)
    with pytest.raises(PeftOnTopError, match="rank 4 .* above the target_rank 2"):
        model.load_adapter(loras["a"])
    assert not model.config.peft_adapters and not lora_tensors(model)


def test_a_swap_by_peft_itself_on_a_peft_model_around_ours_is_saved_as_it_computes(
    backbones_by_llm, tmp_path
):
    """PEFT's own `hotswap_adapter` on a PeftModel around LaVIN swaps weights and scalings without telling our
    record: the checkpoint saved afterwards reloaded with the old alpha (other logits). A save now records each
    LoRA layer's rank and scaling where they differ from the record."""
    from peft.utils.hotswap import hotswap_adapter

    import mmadapters

    def peft_lavin(seed, lora_alpha):
        model, processor = build(backbones_by_llm, "lavin")
        config = LoraConfig(r=4, lora_alpha=lora_alpha, target_modules=r".*language_model.*\.(q_proj|v_proj)")
        peft_model = get_peft_model(model, config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        return peft_model, processor

    served, processor = peft_lavin(1, lora_alpha=8)
    mmadapters.adopt_peft_model(served)
    batch = tiny_sample_inputs(processor)
    other, _ = peft_lavin(2, lora_alpha=16)
    other.save_pretrained(tmp_path / "other")  # PEFT's own save (not adopted): an adapter file
    hotswap_adapter(served, str(tmp_path / "other"), adapter_name="default", torch_device="cpu")
    expected = logits(other, batch)
    torch.testing.assert_close(logits(served, batch), expected)
    assert_reloads_to(served.get_base_model(), batch, expected, tmp_path / "after")
    assert served.get_base_model().config.peft_adapters["default"]["config"]["lora_alpha"] == 16


def test_a_record_that_describes_its_layers_is_saved_as_written(backbones_by_llm, tmp_path):
    """The check before a save changes nothing where the record builds the layers as they are (regex patterns
    stay as the user wrote them)."""
    model, processor = build(backbones_by_llm, "lavin")
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={r"layers\.0\..*q_proj": 2},
        alpha_pattern={r"layers\.1\..*v_proj": 2},
    )
    model.add_adapter(config)
    written = dict(model.config.peft_adapters["default"]["config"])
    assert_reloads_to(
        model, tiny_sample_inputs(processor), logits(model, tiny_sample_inputs(processor)), tmp_path
    )
    assert model.config.peft_adapters["default"]["config"] == written
