"""The MM-Adapter building blocks and their injection (LAVIN.md sections 1, 2 and 5)."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    MORE_LLM_FAMILIES,
    VISION_FAMILIES,
    greedy_without_cache,
    tiny_text_config,
    tiny_vision_config,
)
from torch import nn
from transformers import AutoModelForCausalLM, CLIPVisionConfig, LlamaConfig

from mmadapters import LavinConfig, LavinForConditionalGeneration, MMAdapterConfig
from mmadapters.modeling.adapters import GroupedLinear, MMAdapter
from mmadapters.modeling.paper_configs import llama_7b_config, llama_13b_config, vit_l14_config


def test_grouped_linear_equals_official_grouped_conv1d():
    torch.manual_seed(0)
    conv = nn.Conv1d(8, 64, kernel_size=1, groups=2, bias=True)
    grouped = GroupedLinear(8, 64, groups=2)
    with torch.no_grad():
        grouped.weight.copy_(conv.weight.squeeze(-1))
        grouped.bias.copy_(conv.bias)
    x = torch.randn(3, 5, 8)
    expected = conv(x.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(grouped(x), expected, rtol=0, atol=1e-6)
    # Block-diagonal: output half 0 does not read hidden units 4..7.
    x2 = x.clone()
    x2[..., 4:] = 0
    torch.testing.assert_close(grouped(x)[..., :32], grouped(x2)[..., :32])


def test_adapter_starts_as_identity_and_matches_formula():
    torch.manual_seed(0)
    config = MMAdapterConfig(dropout=0.0, temperature=5.0, scale=0.5)
    adapter = MMAdapter(16, config)
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(adapter(x), x)  # experts are zero at init
    with torch.no_grad():
        for p in (
            adapter.expert_b.weight,
            adapter.expert_b.bias,
            adapter.expert_d.weight,
            adapter.expert_d.bias,
        ):
            p.normal_()
    w = torch.softmax(adapter.router(x[:, 0]) / 5.0, dim=-1)  # self-routing by the first token
    hidden = adapter.down(x)
    expected = x + 0.5 * (
        w[:, None, 0:1] * adapter.expert_b(hidden) + w[:, None, 1:2] * adapter.expert_d(hidden)
    )
    torch.testing.assert_close(adapter(x), expected)
    given = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = adapter(x, given)
    torch.testing.assert_close(out[0], x[0] + 0.5 * adapter.expert_b(hidden)[0])
    torch.testing.assert_close(out[1], x[1] + 0.5 * adapter.expert_d(hidden)[1])


def test_adapter_init_values():
    adapter = MMAdapter(64, MMAdapterConfig())
    assert (
        torch.count_nonzero(adapter.expert_b.weight) == 0 and torch.count_nonzero(adapter.expert_d.bias) == 0
    )
    assert torch.count_nonzero(adapter.down.bias) == 0
    bound = (6 / (64 + 8)) ** 0.5  # xavier uniform
    assert adapter.down.weight.abs().max() <= bound and adapter.down.weight.std() > bound / 4


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(r=8, groups=3), "must divide r"),
        (dict(dropout=1.0), "dropout"),
        (dict(temperature=0), "temperature"),
        (dict(placement="mlp"), "placement"),
    ],
)
def test_adapter_config_validation(bad, message):
    with pytest.raises(ValueError, match=message):
        MMAdapterConfig(**bad)


def test_adapter_config_round_trip(tmp_path):
    config = MMAdapterConfig(r=4, temperature=5.0, placement="attn_mlp")
    config.save_pretrained(tmp_path)
    assert MMAdapterConfig.from_pretrained(tmp_path) == config
    with pytest.raises(ValueError, match="Unknown MMAdapterConfig field"):
        MMAdapterConfig.from_dict({"r": 8, "lora_alpha": 16})


def llama_7b() -> LlamaConfig:
    return llama_7b_config()


def llama_13b() -> LlamaConfig:
    return llama_13b_config()


def vit_l14() -> CLIPVisionConfig:
    return vit_l14_config()


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "text_config, temperature, expected, llm_part, projector",
    [
        (llama_7b, 10.0, 3_781_296, 2_621_760, 659_584),
        (llama_13b, 5.0, 5_390_080, 4_096_400, 791_680),
    ],
)
def test_full_size_trainable_counts_match_the_paper(text_config, temperature, expected, llm_part, projector):
    with torch.device("meta"):
        model = LavinForConditionalGeneration.from_backbones(
            text_config(), vit_l14(), adapter_config=MMAdapterConfig(temperature=temperature)
        )
    assert model.config.num_image_tokens == 6
    assert trainable(model) == expected
    assert trainable(model.llm_adapters) == llm_part
    assert trainable(model.vision_adapters) == 491_760
    assert trainable(model.projector) == projector
    assert model.modality_embedding.weight.numel() == 2 * model.config.text_config.hidden_size
    # Nothing else trains: every trainable tensor belongs to the adapter side.
    assert all(
        name.split(".")[0] in ("llm_adapters", "vision_adapters", "projector", "modality_embedding")
        for name, p in model.named_parameters()
        if p.requires_grad
    )


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_injection_keeps_base_parameter_names(kind):
    torch.manual_seed(0)
    bare = AutoModelForCausalLM.from_config(tiny_text_config(kind))
    bare_names = set(bare.state_dict())
    model = LavinForConditionalGeneration.from_backbones(tiny_text_config(kind), tiny_vision_config())
    lm_names = {
        k.removeprefix("language_model.") for k in model.state_dict() if k.startswith("language_model.")
    }
    assert lm_names == bare_names
    assert len(model.llm_adapters) == 3
    assert not any(p.requires_grad for p in model.language_model.parameters())
    assert not any(p.requires_grad for p in model.vision_tower.parameters())


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_adapter_changes_llm_output_through_the_hook(kind, randomize_adapters):
    model = LavinForConditionalGeneration.from_backbones(tiny_text_config(kind), tiny_vision_config()).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    before = model(input_ids=ids).logits
    randomize_adapters(model)
    after = model(input_ids=ids).logits
    assert (before - after).abs().max() > 1e-3


def test_mlp_placement_adds_a_second_adapter_per_layer(randomize_adapters):
    config = MMAdapterConfig(placement="attn_mlp")
    model = LavinForConditionalGeneration.from_backbones(
        tiny_text_config(), tiny_vision_config(), adapter_config=config
    )
    assert all(len(layer.sites()) == 2 for layer in model.llm_adapters)
    assert model.compute_routing_table().shape == (2, 3, 2, 2)
    randomize_adapters(model)
    ids = torch.tensor([[5, 6, 7]])
    base = model.language_model(input_ids=ids, position_ids=torch.arange(1, 4)[None]).logits
    assert (model(input_ids=ids).logits - base).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["llama", "mixtral", "gemma3"])
def test_each_llm_adapter_gives_its_module_its_input(kind, randomize_adapters):
    """The attention-site adapter's output is what self-attention receives and the MLP-site adapter's what the
    MLP receives (LAVIN.md section 2). Gemma 2/3 (and OLMo 2, Exaone 4, ...) apply `post_attention_layernorm` to
    the attention *output* and give the MLP input its own norm: the MLP adapter sat on the attention output."""
    from mmadapters.modeling.adapters import find_decoder_layers

    model = LavinForConditionalGeneration.from_backbones(
        tiny_text_config(kind), tiny_vision_config(), adapter_config=MMAdapterConfig(placement="attn_mlp")
    ).eval()
    randomize_adapters(model)
    layer, adapters = find_decoder_layers(model.language_model)[1], model.llm_adapters[1]
    received, produced = {}, {}
    for site, module, adapter in (("attn", layer.self_attn, adapters.attn), ("mlp", layer.mlp, adapters.mlp)):
        module.register_forward_pre_hook(  # registered after ours: it sees the adapted input
            lambda m, args, kwargs, site=site: received.__setitem__(
                site, kwargs.get("hidden_states", *args[:1])
            ),
            with_kwargs=True,
        )
        adapter.register_forward_hook(lambda m, args, output, site=site: produced.__setitem__(site, output))
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    for site in ("attn", "mlp"):
        torch.testing.assert_close(received[site], produced[site], msg=f"{kind}: the {site} input")


@pytest.mark.parametrize("kind", sorted(MORE_LLM_FAMILIES))
def test_more_llm_families_take_attention_site_adapters(kind, randomize_adapters):
    """The LLM families the README names beyond Llama: self-attention receives the adapted states and the routing
    weights reach every layer. Llama 4's text model: transformers' get_decoder returns the Llama4ForCausalLM itself
    (its base model is not stored under base_model_prefix), the decoder is its `model` (before: "Cannot find the
    decoder layers"); its MLP is called `feed_forward`, so placement="attn_mlp" is refused by name."""
    from mmadapters.modeling.adapters import find_decoder_layers

    model = LavinForConditionalGeneration.from_backbones(tiny_text_config(kind), tiny_vision_config()).eval()
    randomize_adapters(model)
    layer, adapter = find_decoder_layers(model.language_model)[1], model.llm_adapters[1].attn
    received, produced = [], []
    layer.self_attn.register_forward_pre_hook(
        lambda m, args, kwargs: received.append(kwargs.get("hidden_states", *args[:1])), with_kwargs=True
    )
    adapter.register_forward_hook(lambda m, args, output: produced.append((args[0], output)))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        as_text = model(input_ids=ids, modality=torch.tensor([0])).logits
        as_image = model(input_ids=ids, modality=torch.tensor([1])).logits
    adapter_input, adapter_output = produced[-1]
    torch.testing.assert_close(received[-1], adapter_output)  # self-attention receives the adapted states
    assert not torch.allclose(adapter_input, adapter_output)
    assert not torch.allclose(as_text, as_image)  # the routing weights reach the adapters through the layers
    if kind == "llama4":
        with pytest.raises(ValueError, match="has no `mlp`"):
            LavinForConditionalGeneration.from_backbones(
                tiny_text_config(kind),
                tiny_vision_config(),
                adapter_config=MMAdapterConfig(placement="attn_mlp"),
            )


@pytest.mark.parametrize("kind", ["lavin", "crome"])
def test_an_llm_with_per_layer_token_embeddings_reads_them_from_the_ids(kind, randomize_adapters):
    """Gemma 4 (and Gemma 3n) give each decoder layer an embedding of the token id besides the input embeddings.
    Given embeddings alone, as our models give them, the LLM recovers the ids by matching its embedding table,
    which fails at the visual tokens: both models stopped at the first image with transformers' "the
    `inputs_embeds` you provided do not exactly match the embedding weights". The ids are looked up as
    transformers' Gemma 4 vision-language model does (the pad token at the placeholders): a text-only sequence
    runs as on the bare LLM, the text before an image is unchanged by it, and cached generation equals a greedy
    loop without cache; LaVIN's learned routing runs its modality token through the LLM the same way."""
    from mmadapters import CromeForConditionalGeneration

    config = tiny_text_config("gemma4_ple")
    if kind == "lavin":
        model = LavinForConditionalGeneration.from_backbones(
            config, tiny_vision_config(), adapter_config=MMAdapterConfig(llm_routing="learned")
        )
    else:
        model = CromeForConditionalGeneration.from_backbones(config, tiny_vision_config(), num_query_tokens=4)
    model.eval()
    text = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():  # at initialisation the text path is the bare LLM's
        torch.testing.assert_close(model(input_ids=text).logits, model.language_model(input_ids=text).logits)
    randomize_adapters(model)
    placeholders = [model.config.image_token_id] * model.config.num_image_tokens
    ids = torch.tensor([[1, 5, 6, *placeholders, 7, 8]])
    inputs = {"input_ids": ids, "pixel_values": torch.randn(1, 3, 32, 32)}
    if kind == "crome":
        inputs.update(qformer_input_ids=torch.tensor([[1, 2, 3]]), prompt_mask=torch.ones_like(ids))
    with torch.no_grad():
        with_image = model(**inputs).logits
        prefix = model(input_ids=ids[:, :3], **({"prompt_mask": torch.ones(1, 3)} if kind == "crome" else {}))
    assert torch.isfinite(with_image).all()
    if kind == "lavin":  # LaVIN routes the whole sequence by its modality: the prefix alone is text-only
        prefix = model(input_ids=ids[:, :3], modality=torch.tensor([1]))
    torch.testing.assert_close(with_image[:, :3], prefix.logits)
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, greedy_without_cache(model, inputs, 3))


def test_a_hybrid_llm_takes_adapters_before_its_linear_attention_too(randomize_adapters, tmp_path):
    """Hybrid LLMs (Qwen3.5, Qwen3-Next) replace self-attention by linear attention (`linear_attn`)
    in some layers. Before: refused by name when the first layer was a linear one ("has no `self_attn`"), and an
    AttributeError from inside the model's construction when a later one was. The attention-site adapter sits in
    front of whichever token mixer the layer has (ours: the paper's LLaMA has self-attention only): it starts as
    the identity, routes in every layer, and cached generation equals a greedy loop; merged export is refused
    (those projections can take no constant term)."""
    from mmadapters.convert.merge import MergeError, merge_lavin_adapters
    from mmadapters.modeling.adapters import find_decoder_layers

    model = LavinForConditionalGeneration.from_backbones(
        tiny_text_config("qwen3_5"), tiny_vision_config()
    ).eval()
    text = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=text).logits, model.language_model(input_ids=text).logits)
    randomize_adapters(model)
    received = []
    for layer, mixer in zip(
        find_decoder_layers(model.language_model), ("linear_attn", "self_attn"), strict=True
    ):
        getattr(layer, mixer).register_forward_pre_hook(
            lambda m, args, kwargs: received.append(kwargs.get("hidden_states", *args[:1])), with_kwargs=True
        )
    produced = []
    for adapters in model.llm_adapters:
        adapters.attn.register_forward_hook(lambda m, args, output: produced.append(output))
    with torch.no_grad():
        as_text = model(input_ids=text, modality=torch.tensor([0])).logits
        as_image = model(input_ids=text, modality=torch.tensor([1])).logits
    # Both token mixers receive what their adapter made (the routing-table pass included).
    assert len(received) >= 4 and all(
        torch.equal(got, made) for got, made in zip(received, produced, strict=True)
    )
    assert not torch.allclose(as_text, as_image)
    ids = torch.tensor([[1, 5, *[model.config.image_token_id] * model.config.num_image_tokens, 7, 8]])
    inputs = {"input_ids": ids, "pixel_values": torch.randn(1, 3, 32, 32)}
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, greedy_without_cache(model, inputs, 3))
    with pytest.raises(MergeError, match=r"Decoder layers \[0\] of Qwen3_5ForCausalLM use linear attention"):
        merge_lavin_adapters(model)
    with torch.no_grad():  # refused before anything changed
        torch.testing.assert_close(model(input_ids=text, modality=torch.tensor([0])).logits, as_text)


def test_a_decoder_layer_without_a_token_mixer_is_named_wherever_it_is():
    """Only the first decoder layer was checked: a later layer without self-attention stopped the construction with
    an AttributeError."""
    llm = AutoModelForCausalLM.from_config(tiny_text_config())
    del llm.model.layers[2].self_attn
    with pytest.raises(ValueError, match=r"LlamaDecoderLayer \(decoder layer 2\) has no `self_attn`"):
        LavinForConditionalGeneration.from_backbones(llm, tiny_vision_config())


# Towers whose output has no CLS token before the patches (see mmadapters.modeling.vision_layout).
TOWERS_WITHOUT_CLS = [
    kind
    for kind in ("siglip", "idefics3", "smolvlm", "granite_docling", "phi4_multimodal", "janus")
    if kind in VISION_FAMILIES
]


@pytest.mark.parametrize("kind", ["clip", "blip", "metaclip2", *TOWERS_WITHOUT_CLS])
def test_lavin_reads_the_cls_token_or_the_mean_where_a_tower_has_none(kind):
    """The visual features are each feature layer's CLS token, or the mean of its tokens where the tower has no
    CLS token. Before: SigLIP-based towers of other model types (Idefics3 / SmolVLM, Phi-4-multimodal, Janus) were
    read at their first token, which is a patch, and their vision adapters routed by it."""
    torch.manual_seed(0)
    model = LavinForConditionalGeneration.from_backbones(tiny_text_config(), tiny_vision_config(kind)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.pooled_vision_features(pixels)
        hidden = model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
    layers = model.config.vision_feature_layers
    if kind in TOWERS_WITHOUT_CLS:
        assert model.config.vision_feature_pooling == "mean"
        assert model.vision_adapters[0].router_token == "mean"
        expected = torch.stack([hidden[layer].mean(dim=1) for layer in layers], dim=1)
    else:
        assert model.config.vision_feature_pooling == "cls"
        expected = torch.stack([hidden[layer][:, 0] for layer in layers], dim=1)
    torch.testing.assert_close(features, expected)


def test_cls_pooling_on_a_tower_without_cls_token_is_refused(monkeypatch):
    """Asked for by name, refused when the config is built; on a tower the layout table does not know, at the first
    image, before anything is read from a patch."""
    with pytest.raises(ValueError, match="has no CLS token.*vision_feature_pooling='mean'"):
        LavinConfig(
            text_config=tiny_text_config(),
            vision_config=tiny_vision_config("siglip"),
            vision_feature_pooling="cls",
        )
    from mmadapters.modeling import vision_layout

    monkeypatch.delitem(vision_layout.TOKENS_BEFORE_PATCHES, "idefics3_vision")
    model = LavinForConditionalGeneration.from_backbones(tiny_text_config(), tiny_vision_config("idefics3"))
    assert model.config.vision_feature_pooling == "cls"
    with pytest.raises(
        ValueError, match="16 tokens for 16 patches.*no CLS token.*vision_feature_pooling='mean'"
    ):
        model.image_tokens(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_vision_adapters_route_each_image_by_itself(kind, randomize_adapters):
    model = LavinForConditionalGeneration.from_backbones(tiny_text_config(), tiny_vision_config(kind)).eval()
    assert model.config.vision_feature_pooling == ("cls" if kind == "clip" else "mean")
    randomize_adapters(model)
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 32, 32)
    together = model.image_tokens(pixels)
    alone = torch.cat([model.image_tokens(pixels[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert together.shape == (3, 2, 32)  # 8 vision layers -> feature layers 4 and 8


def test_official_vision_routing_parity_flag_routes_by_the_first_image(randomize_adapters):
    config = MMAdapterConfig(official_vision_routing=True)
    model = LavinForConditionalGeneration.from_backbones(
        tiny_text_config(), tiny_vision_config(), adapter_config=config
    )
    randomize_adapters(model.eval())
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32)
    # Image 1's features depend on image 0 (shared routing), unlike the default per-image routing.
    with_zero = model.image_tokens(pixels)[1]
    other = pixels.clone()
    other[0] = torch.randn(3, 32, 32)
    assert (model.image_tokens(other)[1] - with_zero).abs().max() > 1e-6


def test_wrong_lavin_config_is_a_clear_error(tmp_path):
    from mmadapters import LavinConfig

    with pytest.raises(ValueError, match="vision_feature_layers=\\[4, 30\\] must name layers 1..8"):
        LavinConfig(
            text_config=tiny_text_config(), vision_config=tiny_vision_config(), vision_feature_layers=[4, 30]
        )
    with pytest.raises(ValueError, match="Unknown MMAdapterConfig field"):
        LavinConfig(
            text_config=tiny_text_config(), vision_config=tiny_vision_config(), adapter_config={"alpha": 1}
        )
    with pytest.raises(ValueError, match="MMAdapterConfig.peft_type must be 'MMA', got 'LORA'"):
        LavinConfig(
            text_config=tiny_text_config(),
            vision_config=tiny_vision_config(),
            adapter_config={"peft_type": "LORA"},
        )
    # The same check for an adapter_config.json file (the layout of versions before 0.2), naming the file.
    MMAdapterConfig(peft_type="LORA").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"adapter_config.json: MMAdapterConfig.peft_type must be 'MMA'"):
        MMAdapterConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="projector_hidden_size must be a positive integer"):
        LavinConfig(
            text_config=tiny_text_config(), vision_config=tiny_vision_config(), projector_hidden_size=0
        )
    # Values a hand-edited config.json may hold: named with their field, not read as something else ("median"
    # pooled as the mean, a string compared with a number).
    common = dict(text_config=tiny_text_config(), vision_config=tiny_vision_config())
    with pytest.raises(ValueError, match="vision_feature_pooling must be 'cls' or 'mean', got 'median'"):
        LavinConfig(**common, vision_feature_pooling="median")
    with pytest.raises(
        ValueError, match=r"LavinConfig.projector_hidden_size must be an integer, got '128' \(str\)"
    ):
        LavinConfig(**common, projector_hidden_size="128")
    with pytest.raises(
        ValueError, match=r"LavinConfig.vision_feature_whitening must be true or false, got 'yes'"
    ):
        LavinConfig(**common, vision_feature_whitening="yes")
    with pytest.raises(ValueError, match="image_token_id must be a non-negative integer, got -5"):
        LavinConfig(**common, image_token_id=-5)
    # from_backbones takes the adapter settings as a config or a dict of its fields; anything else is refused.
    from_dict = LavinForConditionalGeneration.from_backbones(
        tiny_text_config(), tiny_vision_config(), adapter_config={"r": 4, "groups": 2}
    )
    assert (from_dict.config.mm_adapter_config.r, from_dict.config.mm_adapter_config.groups) == (4, 2)
    with pytest.raises(ValueError, match="Unknown MMAdapterConfig field"):
        LavinForConditionalGeneration.from_backbones(
            tiny_text_config(), tiny_vision_config(), adapter_config={"rank": 4}
        )
    from mmadapters.modeling.adapters.config import CromeAdapterConfig

    with pytest.raises(TypeError, match="adapter_config must be a MMAdapterConfig .* got CromeAdapterConfig"):
        LavinForConditionalGeneration.from_backbones(
            tiny_text_config(), tiny_vision_config(), adapter_config=CromeAdapterConfig()
        )


def test_wrong_crome_config_is_a_clear_error():
    from conftest import tiny_qformer_config

    from mmadapters import CromeConfig

    common = dict(
        text_config=tiny_text_config(),
        vision_config=tiny_vision_config(),
        qformer_config=tiny_qformer_config(),
    )
    with pytest.raises(ValueError, match="num_query_tokens must be a positive integer"):
        CromeConfig(**common, num_query_tokens=0)
    with pytest.raises(ValueError, match=r"vision_feature_layer=9 must index .* \(-9..8"):
        CromeConfig(**common, vision_feature_layer=9)
    assert CromeConfig(**common, vision_feature_layer=-9).vision_feature_layer == -9  # the embeddings
    with pytest.raises(ValueError, match=r"CromeConfig.use_patch_branch must be true or false, got 'no'"):
        CromeConfig(**common, use_patch_branch="no")  # a string would have turned the branch on
    with pytest.raises(
        ValueError, match=r"CromeConfig.num_query_tokens must be an integer, got 32.0 \(float\)"
    ):
        CromeConfig(**common, num_query_tokens=32.0)


def test_unsupported_llm_architecture_is_a_clear_error():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="decoder layers|input_layernorm"):
        LavinForConditionalGeneration.from_backbones(
            GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100), tiny_vision_config()
        )


def test_initialisation_survives_model_construction():
    """transformers' init pass must not overwrite the paper's initialisation inside a built model."""
    torch.manual_seed(0)
    model = LavinForConditionalGeneration.from_backbones(
        tiny_text_config(hidden_size=256, num_attention_heads=4), tiny_vision_config()
    )
    adapter = model.llm_adapters[0].attn
    xavier_std = (2 / (256 + 8)) ** 0.5
    assert abs(adapter.down.weight.std().item() - xavier_std) / xavier_std < 0.15
    assert torch.count_nonzero(adapter.expert_b.weight) == 0 and torch.count_nonzero(adapter.down.bias) == 0
    kaiming_std = (1 / 256) ** 0.5 / 3**0.5 * 1.0  # kaiming_uniform(a=sqrt(5)): bound 1/sqrt(fan_in)
    assert abs(adapter.router.weight.std().item() - kaiming_std) / kaiming_std < 0.2
    assert 0.7 < model.modality_embedding.weight.std().item() < 1.3  # N(0, 1)
    projector = model.projector.linear_1
    assert (
        torch.count_nonzero(projector.bias) == 0 and projector.weight.std() > 0.05
    )  # Xavier, not N(0, 0.02)


def test_concurrent_requests_route_independently(tiny_backbones, randomize_adapters):
    """Two threads serve an image request and a text-only request on one model at the same time, over and over
    (MLP-site adapters too, whose routing is handed over inside each layer call): each thread gets exactly the
    sequential result, in forward and in generate (folded adapters)."""
    import threading

    from mmadapters import LavinProcessor

    torch.manual_seed(0)
    model = LavinForConditionalGeneration.from_backbones(
        *tiny_backbones, adapter_config=MMAdapterConfig(placement="attn_mlp", temperature=1.0)
    ).eval()
    randomize_adapters(model, std=0.5)
    processor = LavinProcessor.from_backbones(*tiny_backbones)
    image = (torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    requests = {
        "image": processor(images=[[image]], text=["Image: <image>\nwhat color is the shape?"]),
        "text": processor(text=["Image: N/A\nthe capital of france is"]),
    }
    table = model.compute_routing_table()
    assert (table[0] - table[1]).abs().max() > 1e-3  # the modalities really are routed differently
    with torch.no_grad():
        expected = {
            k: (model(**v).logits, model.generate(**v, max_new_tokens=4, do_sample=False))
            for k, v in requests.items()
        }

    mismatches: list[str] = []
    start = threading.Barrier(2)

    def serve(kind: str) -> None:
        start.wait()
        for _ in range(15):
            with torch.no_grad():
                logits = model(**requests[kind]).logits
                tokens = model.generate(**requests[kind], max_new_tokens=4, do_sample=False)
            if not torch.allclose(logits, expected[kind][0], atol=1e-6, rtol=0):
                mismatches.append(f"{kind} logits")
            if not torch.equal(tokens, expected[kind][1]):
                mismatches.append(f"{kind} tokens")

    threads = [threading.Thread(target=serve, args=(kind,)) for kind in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not mismatches, mismatches[:5]


def test_deepcopy_and_hook_removal(tiny_backbones):
    import copy

    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones).eval()
    ids = torch.tensor([[1, 40, 50, 60]])
    clone = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(clone(input_ids=ids).logits, model(input_ids=ids).logits)
        bare = model.language_model(input_ids=ids, position_ids=torch.arange(1, 5)[None]).logits
        with_adapters = model(input_ids=ids).logits
        randomize = torch.Generator().manual_seed(3)
        for parameter in model.llm_adapters.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=randomize))
        assert (model(input_ids=ids).logits - with_adapters).abs().max() > 1e-3  # the hooks act
        # the copy runs its own adapters
        torch.testing.assert_close(clone(input_ids=ids).logits, with_adapters)
        model.remove_adapter_hooks()
        torch.testing.assert_close(
            model.language_model(input_ids=ids, position_ids=torch.arange(1, 5)[None]).logits, bare
        )
