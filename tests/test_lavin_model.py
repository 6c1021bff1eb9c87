"""LavinForConditionalGeneration: routing, visual path, generation, training (LAVIN.md sections 3 and 4)."""

from __future__ import annotations

import copy
import functools
import types

import pytest
import torch
from conftest import dropout_off, tiny_sample_inputs, tiny_text_config, tiny_vision_config
from transformers import AutoModelForCausalLM

from mmadapters import ImageTokenMismatchError, LavinForConditionalGeneration, LavinProcessor
from mmadapters.modeling.transformers_compat import enable_activation_checkpointing


@pytest.fixture()
def model(tiny_backbones):
    torch.manual_seed(0)
    return LavinForConditionalGeneration.from_backbones(*tiny_backbones).eval()


@pytest.fixture()
def processor(tiny_backbones):
    return LavinProcessor.from_backbones(*tiny_backbones)


def official_reference_logits(model, input_ids, pixel_values=None):
    """The official LaVIN forward, written from the spec: the modality embedding is prepended at position 0,
    attends only to itself, no later token attends to it, and every adapter routes by the normed hidden state
    of that first token (the adapters' self-routing mode). Text starts at position 1."""
    embeds = model.embed_tokens(input_ids)
    image_mask = input_ids == model.config.image_token_id
    if pixel_values is not None:
        features = model.image_tokens(pixel_values).reshape(-1, embeds.shape[-1])
        embeds = embeds.clone()
        embeds[image_mask] = features
    modality = image_mask.any(dim=-1).long()
    x = torch.cat([model.modality_embedding(modality)[:, None], embeds], dim=1)
    length = x.shape[1]
    allowed = torch.tril(torch.ones(length, length, dtype=torch.bool))
    allowed[1:, 0] = False
    mask = torch.zeros(length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)
    mask = mask[None, None].expand(x.shape[0], 1, length, length)
    logits = model.language_model(
        inputs_embeds=x, attention_mask=mask, position_ids=torch.arange(length)[None]
    ).logits
    return logits[:, 1:]


def test_router_equivalence_with_official_prepended_token(model, processor, randomize_adapters):
    randomize_adapters(model, std=0.5)
    torch.manual_seed(0)
    image_prompt = "Image: <image>\nwhat color is the shape?"
    text_prompt = "Image: N/A\nthe capital of france is"
    for prompt, images in (
        (image_prompt, [torch.rand(3, 32, 32).numpy().transpose(1, 2, 0)]),
        (text_prompt, None),
    ):
        if images is not None:
            images = [(images[0] * 255).astype("uint8")]
        inputs = processor(images=images, text=prompt)
        with torch.no_grad():
            ours = model(**inputs).logits
            reference = official_reference_logits(model, inputs["input_ids"], inputs.get("pixel_values"))
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    # The two modalities are routed differently (otherwise the test above would prove little).
    table = model.compute_routing_table()
    assert (table[0] - table[1]).abs().max() > 1e-4


def test_routing_table_shape_and_rows(model):
    table = model.compute_routing_table()
    assert table.shape == (2, 3, 1, 2)
    torch.testing.assert_close(table.sum(-1), torch.ones(2, 3, 1))


def test_text_only_logits_equal_base_llm_at_init(tiny_backbones, model):
    base = AutoModelForCausalLM.from_pretrained(tiny_backbones[0], dtype=torch.float32).eval()
    ids = torch.tensor([[1, 40, 50, 60, 70, 80]])
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        same_positions = base(input_ids=ids, position_ids=torch.arange(1, 7)[None]).logits
    torch.testing.assert_close(ours, same_positions, rtol=0, atol=1e-5)


def image(seed: int, size: int = 32):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(size, size, 3, generator=generator) * 255).to(torch.uint8).numpy()


def test_batched_mixed_generation_equals_one_by_one(model, processor, randomize_adapters):
    randomize_adapters(model, std=0.3)
    prompts = [
        "Image: <image>\nwhat color is the shape?",
        "Image: N/A\nthe capital of",
        "Image: <image>\nwhat shape",
    ]
    images = [[image(0)], [], [image(1)]]
    batch = processor(images=images, text=prompts)
    assert (batch["attention_mask"][:, 0] == 0).any()  # left padded
    kwargs = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6)
    batched = model.generate(**batch, **kwargs)
    new_batched = batched[:, batch["input_ids"].shape[1] :]
    for i in range(3):
        single = processor(images=images[i] or None, text=prompts[i])
        alone = model.generate(**single, **kwargs)[:, single["input_ids"].shape[1] :]
        assert new_batched[i].tolist() == alone[0].tolist()
        no_cache = model.generate(**single, use_cache=False, **kwargs)[:, single["input_ids"].shape[1] :]
        assert no_cache[0].tolist() == alone[0].tolist()


def test_generate_from_inputs_embeds_equals_generate_from_input_ids(model, processor, randomize_adapters):
    """generate(inputs_embeds=..., modality=...) as transformers' decoder-only models take it (it returns the new
    tokens only): text embeddings, and an image sample whose visual tokens the caller placed. Before: transformers
    refused with "doesn't have its forwarding implemented" (the inputs_embeds parameter was missing from
    prepare_inputs_for_generation's signature)."""
    randomize_adapters(model, std=0.3)
    batch = processor(
        images=[[image(0)], []], text=["Image: <image>\nwhat color?", "Image: N/A\nthe capital of"]
    )
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    from_ids = model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1] :]
    image_mask = batch["input_ids"] == model.config.image_token_id
    embeds = model.get_input_embeddings()(batch["input_ids"].masked_fill(image_mask, 0))
    with torch.no_grad():
        features = model.get_image_features(batch["pixel_values"]).pooler_output
        embeds[image_mask] = features.reshape(-1, embeds.shape[-1])
    modality = image_mask.any(dim=-1).long()
    from_embeds = model.generate(
        inputs_embeds=embeds, attention_mask=batch["attention_mask"], modality=modality, **kwargs
    )
    assert from_embeds.tolist() == from_ids.tolist()


def test_generate_runs_vision_tower_and_routing_once(model, processor):
    calls = {"vision": 0, "table": 0}
    model.vision_tower.register_forward_hook(lambda *args: calls.__setitem__("vision", calls["vision"] + 1))
    original = model.compute_routing_table

    def counted():
        calls["table"] += 1
        return original()

    model.compute_routing_table = counted
    inputs = processor(images=[image(0)], text="Image: <image>\nwhat color")
    model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert calls == {"vision": 1, "table": 1}


def test_one_optimizer_step_changes_adapters_only(model, processor):
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = processor(
        images=[[image(0)], []],
        text=["Image: <image>\nwhat color", "Image: N/A\nhello"],
        answers=["red", "world"],
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed  # something trained
    assert all(
        k.split(".")[0] in ("llm_adapters", "vision_adapters", "projector", "modality_embedding")
        for k in changed
    )
    for k in before:
        if k.startswith(("language_model.", "vision_tower.")):
            assert torch.equal(before[k], after[k]), k
    # The experts, the routers, the projector and the modality embedding all received gradients.
    assert any(k.startswith("llm_adapters") and "expert" in k for k in changed)
    assert any(k.startswith("vision_adapters") and "expert" in k for k in changed)
    assert any(k.startswith("projector") for k in changed) and "modality_embedding.weight" in changed


def test_loss_supervises_only_the_answer(model, processor):
    inputs = processor(text=["Image: N/A\nhello"], answers=["world"])
    logits = model(**inputs).logits
    labels = inputs["labels"]
    expected = torch.nn.functional.cross_entropy(
        logits[0, :-1][labels[0, 1:] != -100], labels[0, 1:][labels[0, 1:] != -100]
    )
    torch.testing.assert_close(model(**inputs).loss, expected)


def test_a_forward_put_on_the_model_ignores_placeholder_labels_and_a_copy_runs_its_own_weights(
    model, processor, randomize_adapters
):
    # What TRL's fused LM head and accelerate's device hooks do: a forward assigned to the model. Labels given to it
    # lose their image placeholders before it runs (the model's own forward ignores them; a head computing the
    # loss itself would score them as a token), and a deepcopy of the model runs the copy's weights.
    randomize_adapters(model)
    inputs = tiny_sample_inputs(processor)
    seen = []

    def loss_of_its_own(*args, labels=None, **kwargs):
        seen.append(labels)
        return type(model).forward(model, *args, **kwargs)

    model.forward = loss_of_its_own
    labels = inputs["input_ids"].clone()
    model(**inputs, labels=labels)
    placeholders = inputs["input_ids"] == model.config.image_token_id
    assert placeholders.any() and (seen[0][placeholders] == -100).all()
    assert torch.equal(seen[0][~placeholders], labels[~placeholders])

    # accelerate's kinds: a partial (device hooks), a method whose __func__ it wraps again (mixed precision)
    for forward in (
        functools.partial(type(model).forward, model),
        types.MethodType(type(model).forward, model),
    ):
        model.forward = forward
        assert isinstance(model.forward, type(forward))
        copied = copy.deepcopy(model)
        with torch.no_grad():
            for parameter in copied.parameters():
                if parameter.requires_grad:
                    parameter.normal_()
            assert not torch.equal(copied(**inputs).logits, model(**inputs).logits)
            torch.testing.assert_close(copied(**inputs).logits, type(copied).forward(copied, **inputs).logits)


def test_image_token_mismatch_is_a_clear_error(model, processor):
    inputs = processor(images=[image(0)], text="Image: <image>\nwhat color")
    with pytest.raises(ImageTokenMismatchError, match="2 image\\(s\\) x 2 visual tokens"):
        model(input_ids=inputs["input_ids"], pixel_values=torch.cat([inputs["pixel_values"]] * 2))
    with pytest.raises(ImageTokenMismatchError, match="no pixel_values"):
        model(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match="outside the LLM vocabulary"):
        model(input_ids=torch.tensor([[5, 10_000]]))


def test_gradient_checkpointing_gives_same_gradients(model, processor, randomize_adapters):
    randomize_adapters(model)
    inputs = processor(
        images=[[image(0)], []], text=["Image: <image>\nwhat color", "Image: N/A\nhi"], answers=["red", "yo"]
    )
    model.train()
    dropout_off(model)

    def grads():
        model.zero_grad()
        model(**inputs).loss.backward()
        return {
            n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None
        }

    plain = grads()
    enable_activation_checkpointing(model, {"use_reentrant": False})
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], rtol=1e-4, atol=1e-6)


def test_reentrant_checkpointing_is_refused_not_silently_wrong(model):
    # Reentrant checkpointing would drop the routers' gradients (their weights arrive as keyword arguments).
    with pytest.raises(ValueError, match="use_reentrant=False"):
        enable_activation_checkpointing(model, {"use_reentrant": True})


def test_bf16_backbone_keeps_fp32_adapters():
    model = LavinForConditionalGeneration.from_backbones(
        tiny_text_config(), tiny_vision_config(), dtype=torch.bfloat16
    )
    assert model.language_model.dtype == torch.bfloat16 and model.vision_tower.dtype == torch.bfloat16
    assert model.llm_adapters[0].attn.down.weight.dtype == torch.float32
    out = model(input_ids=torch.tensor([[5, 6, 7]]), pixel_values=None)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


@pytest.mark.parametrize("placement", ["attn", "attn_mlp"])
def test_folded_adapters_equal_routed_adapters(tiny_backbones, processor, randomize_adapters, placement):
    from mmadapters import MMAdapterConfig

    model = LavinForConditionalGeneration.from_backbones(
        *tiny_backbones, adapter_config=MMAdapterConfig(placement=placement)
    ).eval()
    randomize_adapters(model, std=0.3)
    batch = processor(
        images=[[image(0)], []], text=["Image: <image>\nwhat color is it?", "Image: N/A\nthe capital"]
    )
    with torch.no_grad():
        routed = model(**batch).logits
        folded = model(**batch, folded_adapters=model.fold_llm_adapters()).logits
    torch.testing.assert_close(folded, routed, rtol=0, atol=1e-5)
    # generate in train mode (dropout off) takes the routed path; eval mode the folded one: same tokens.
    dropout_off(model)
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    eval_tokens = model.generate(**batch, **kwargs)
    train_tokens = model.train().generate(**batch, **kwargs)
    assert torch.equal(eval_tokens, train_tokens)


@pytest.mark.parametrize("optimizer_kwargs", [{"foreach": True}, {"foreach": False}, {"fused": True}])
def test_generation_follows_weights_updated_by_an_optimizer(model, processor, optimizer_kwargs):
    """Regression: a fold cached across calls went stale after a Trainer's optimizer step."""
    inputs = processor(images=[image(0)], text="Image: <image>\nwhat color", answers=["red"])
    prompt = processor(images=[image(0)], text="Image: <image>\nwhat color")
    with torch.no_grad():
        model.eval().fold_llm_adapters()  # a fold before training
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=0.05, **optimizer_kwargs
    )
    for _ in range(2):
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        routed = model(**prompt).logits
        folded = model(**prompt, folded_adapters=model.fold_llm_adapters()).logits
    torch.testing.assert_close(folded, routed, rtol=0, atol=1e-4)


def test_backbones_keep_their_attention_implementation(model):
    assert model.language_model.config._attn_implementation == "sdpa"
    assert model.vision_tower.config._attn_implementation is not None


def test_peft_lora_composes_with_lavin(model, processor):
    from peft import LoraConfig, get_peft_model

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name and "language_model" in name for name in trainable)
    inputs = processor(images=[image(0)], text="Image: <image>\nwhat color", answers=["red"])
    loss = peft_model(**inputs).loss
    loss.backward()
    assert all(
        p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad and "lora_A" in n
    )


def test_fold_is_reused_until_the_adapters_change(model, randomize_adapters):
    randomize_adapters(model)
    model.eval()
    with torch.no_grad():
        first = model.fold_llm_adapters()
        assert model.fold_llm_adapters() is first  # nothing changed: the same fold
        model.llm_adapters[1].attn.expert_d.bias.data.add_(1e-4)  # `.data` writes bump no version counter
        second = model.fold_llm_adapters()
        assert second is not first and not torch.equal(second.bias, first.bias)
        model.modality_embedding.weight.data[0, 0] += 1e-3
        assert model.fold_llm_adapters() is not second
    assert model.fold_llm_adapters() is not model.fold_llm_adapters()  # with gradients: never cached


def test_modality_routing_keeps_the_text_only_path_and_freezes_the_unused_router(
    tiny_backbones, processor, randomize_adapters, tmp_path
):
    # llm_routing="modality" (ours): text-only sequences through expert D alone, image ones through expert B.
    from mmadapters.modeling.adapters import MMAdapterConfig

    torch.manual_seed(0)
    model = LavinForConditionalGeneration.from_backbones(
        *tiny_backbones, adapter_config=MMAdapterConfig(llm_routing="modality")
    ).eval()
    table = model.compute_routing_table()
    assert table.shape == (2, 3, 1, 2)
    assert table[0, ..., 1].eq(1).all() and table[0, ..., 0].eq(0).all()  # text only: expert D
    assert table[1, ..., 0].eq(1).all() and table[1, ..., 1].eq(0).all()  # with an image: expert B
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert not any(
        (name.startswith("llm_adapters") and ".router." in name) or name.startswith("modality_embedding")
        for name in trainable
    )
    assert any(
        name.startswith("vision_adapters") and ".router." in name for name in trainable
    )  # still learned
    assert any("llm_adapters" in name and "expert_b" in name for name in trainable)
    model.restore_trainable_side()  # what adopt_peft_model calls: the unused routing stays frozen
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable

    # Expert B (what images train) changes, expert D stays zero: text-only answers are the bare LLM's.
    randomize_adapters(model, std=0.5)
    with torch.no_grad():
        for layer in model.llm_adapters:
            layer.attn.expert_d.weight.zero_()
            layer.attn.expert_d.bias.zero_()
    base = AutoModelForCausalLM.from_pretrained(tiny_backbones[0], dtype=torch.float32).eval()
    text = processor(text="Image: N/A\nthe capital of france is")
    image = (torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    with_image = processor(images=[image], text="Image: <image>\nwhat color is it?")
    length = text["input_ids"].shape[1]
    with torch.no_grad():
        ours = model(**text).logits
        bare = base(input_ids=text["input_ids"], position_ids=torch.arange(1, length + 1)[None]).logits
        torch.testing.assert_close(ours, bare, rtol=0, atol=1e-5)
        generated = model.generate(**text, max_new_tokens=5, do_sample=False)
        bare_generated = base.generate(
            input_ids=text["input_ids"],
            attention_mask=text["attention_mask"],
            position_ids=torch.arange(1, length + 1)[None],
            max_new_tokens=5,
            do_sample=False,
        )
        assert torch.equal(generated[:, -5:], bare_generated[:, -5:])
        # The image path does use expert B: zeroing it changes the image sample's logits.
        adapted = model(**with_image).logits
        for layer in model.llm_adapters:
            layer.attn.expert_b.weight.zero_()
        assert (model(**with_image).logits - adapted).abs().max() > 1e-3

    model.save_pretrained(tmp_path / "ckpt")
    loaded = LavinForConditionalGeneration.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.mm_adapter_config.llm_routing == "modality"
    assert torch.equal(loaded.compute_routing_table(), table)


def test_llm_routing_must_be_learned_or_modality():
    from mmadapters.modeling.adapters import MMAdapterConfig

    with pytest.raises(ValueError, match="llm_routing must be 'learned' or 'modality'"):
        MMAdapterConfig(llm_routing="hard")
