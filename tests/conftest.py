"""Shared fixtures: tiny random backbones built from configs, saved locally like Hub checkpoints."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub: it reads HF_HUB_OFFLINE once, at import. Set later (as it was), the
# suite's own process stayed online, and a Hub id with no local copy (a model card's license lookup) tried
# huggingface.co with retries (about 23 s a call here, where it cannot be reached). Tests that talk to the local
# test Hub server turn offline mode off for their duration (the `local_hub_online` fixture).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# transformers 5.25 turns Hub kernels on in every from_pretrained that does not say use_kernels (ours say False);
# tests that load a bare backbone with transformers itself (as a reference) must not fetch kernels either.
os.environ.setdefault("USE_HUB_KERNELS", "NO")
# gradio (the demo's tests) reports usage to api.gradio.app unless told not to: nothing leaves the machine.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import traceback
import warnings
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import transformers
import yaml
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    CLIPImageProcessorPil,
    CLIPVisionModel,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    T5Config,
    T5ForConditionalGeneration,
    TrainingArguments,
)

import mmadapters  # noqa: F401  (registers the Auto classes)

MMADAPTERS_SOURCE = str(Path(mmadapters.__file__).parent)


@pytest.fixture()
def local_hub_online(monkeypatch):
    """huggingface_hub online in this process, for a test that talks to the local test Hub server (tests/hub_server.py,
    reached with an explicit endpoint): the rest of the suite runs offline (HF_HUB_OFFLINE, set above)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


# Deprecations raised by a library's own calls below ours, not by a call of ours (flex attention): transformers 5.24
# passes create_block_mask(_compile=True), which torch 2.13 deprecates, and transformers 5.20's flex attention
# imports a module that uses torch.jit.script_method (we use no torch.jit).
UPSTREAM_DEPRECATIONS = (
    "_compile flag on create_block_mask",
    "`torch.jit.script_method` is deprecated",
)


@pytest.fixture(autouse=True)
def no_deprecated_calls_from_mmadapters():
    """A FutureWarning or DeprecationWarning raised while mmadapters code is on the stack fails the test where it
    happens: our calls must use the current API of every library version the pins allow."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", FutureWarning)
        warnings.simplefilter("always", DeprecationWarning)
        show = warnings.showwarning

        def check(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, (FutureWarning, DeprecationWarning)) and not str(message).startswith(
                UPSTREAM_DEPRECATIONS
            ):
                ours = [f for f in traceback.extract_stack() if f.filename.startswith(MMADAPTERS_SOURCE)]
                if ours:
                    raise AssertionError(
                        f"{category.__name__} raised under mmadapters code ({ours[-1].filename}:{ours[-1].lineno}): "
                        f"{message}"
                    )
            show(message, category, filename, lineno, file, line)

        warnings.showwarning = check
        yield


CORPUS = [
    "what color is the shape? the shape is red. what shape is in the image? a circle.",
    "does the image contain a triangle? yes. no. blue green gray teal black yellow brown rectangle",
    "Image: N/A Image: question answer response instruction user assistant system hello world",
    "the capital of france is paris. one two three four five six seven eight nine ten.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '</s>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    model = Tokenizer(models.BPE(unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    model.train_from_iterator(CORPUS, trainer=trainer)
    from tokenizers import decoders

    model.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# More decoder-only families, by config class and what a tiny one needs besides the common fields.
MORE_LLM_FAMILIES = {
    "phi3": ("Phi3Config", {}),
    "granite": ("GraniteConfig", {}),
    "glm4": ("Glm4Config", {"head_dim": 8}),
    "gpt_oss": ("GptOssConfig", {"head_dim": 8, "num_local_experts": 2, "num_experts_per_tok": 1}),
    "qwen3": ("Qwen3Config", {"head_dim": 8}),
    # Llama 4's text model: transformers' get_decoder does not find its decoder; its MLP is `feed_forward`.
    "llama4": ("Llama4TextConfig", {"head_dim": 8, "intermediate_size_mlp": 64, "num_local_experts": 2}),
}


# LLMs whose layers differ from Llama's in what the tests around them check (not in MORE_LLM_FAMILIES): their
# settings here replace the common ones.
OTHER_LLM_FAMILIES = {
    # Gemma 4 with per-layer token embeddings (PLE)
    "gemma4_ple": (
        "Gemma4TextConfig",
        {
            "head_dim": 8,
            "num_hidden_layers": 2,
            "layer_types": ["sliding_attention", "full_attention"],
            "sliding_window": 16,
            "vocab_size_per_layer_input": 300,
            "hidden_size_per_layer_input": 8,
            "pad_token_id": 0,
        },
    ),
    # Qwen3.5's text model: a linear-attention layer (Gated DeltaNet, `linear_attn`), then a self-attention one
    "qwen3_5": (
        "Qwen3_5TextConfig",
        {
            "head_dim": 8,
            "num_hidden_layers": 2,
            "layer_types": ["linear_attention", "full_attention"],
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "linear_key_head_dim": 8,
            "linear_value_head_dim": 8,
            "linear_conv_kernel_dim": 4,
        },
    ),
    # the original MiniMax: linear attention whose state lives in a cache of its own
    "minimax": (
        "MiniMaxConfig",
        {
            "head_dim": 8,
            "num_hidden_layers": 2,
            "layer_types": ["linear_attention", "full_attention"],
            "num_local_experts": 2,
            "num_experts_per_tok": 1,
        },
    ),
    # DeepSeek-V4: MoE layers routed by token id ("hash_moe") or by the hidden states ("moe")
    "deepseek_v4": (
        "DeepseekV4Config",
        {
            "head_dim": 16,
            "num_hidden_layers": 2,
            "num_key_value_heads": 1,
            "moe_intermediate_size": 32,
            "q_lora_rank": 16,
            "o_lora_rank": 16,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "index_n_heads": 2,
            "index_head_dim": 16,
        },
    ),
}


def tiny_text_config(kind: str = "llama", vocab_size: int = 300, **overrides) -> LlamaConfig:
    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    if kind in OTHER_LLM_FAMILIES:
        class_name, extra = OTHER_LLM_FAMILIES[kind]
        return getattr(transformers, class_name)(**{**common, **extra, **overrides})
    common.update(overrides)
    if kind == "mixtral":  # mixture of experts
        from transformers import MixtralConfig

        return MixtralConfig(**{"num_local_experts": 4, "num_experts_per_tok": 2, **common})
    if kind in MORE_LLM_FAMILIES:  # the README names them as LLMs LaVIN takes (test_adapters.py)
        class_name, extra = MORE_LLM_FAMILIES[kind]
        return getattr(transformers, class_name)(**{**extra, **common})
    if kind == "gemma3":  # norms around attention and MLP ("sandwich"): the MLP input has its own norm
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(**{"head_dim": 8, **common})
    return {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[kind](**common)


# Vision towers by config class and what a tiny one needs besides the common fields; the comment says which tokens
# come before the patches in the tower's output (CROME's patch branch skips them).
VISION_FAMILIES = {
    "clip": ("CLIPVisionConfig", {}),  # CLS
    "siglip": ("SiglipVisionConfig", {}),  # none
    "blip": ("BlipVisionConfig", {}),  # CLS
    "instructblip": ("InstructBlipVisionConfig", {}),  # CLS
    "metaclip2": ("MetaClip2VisionConfig", {}),  # CLS
    "vit": ("ViTConfig", {}),  # CLS
    "dinov2": ("Dinov2Config", {}),  # CLS
    "dinov2_registers": ("Dinov2WithRegistersConfig", {"num_register_tokens": 4}),  # CLS, 4 registers
    "aimv2": ("Aimv2VisionConfig", {}),  # none
    "ijepa": ("IJepaConfig", {}),  # none
    "deit": ("DeiTConfig", {}),  # CLS, distillation token
    # SigLIP-based towers of other model types: none
    "idefics3": ("Idefics3VisionConfig", {}),
    "smolvlm": ("SmolVLMVisionConfig", {}),
    "granite_docling": ("GraniteDoclingVisionConfig", {}),
    "phi4_multimodal": ("Phi4MultimodalVisionConfig", {}),
    "janus": ("JanusVisionConfig", {}),
}
# Only the towers this transformers release has (Granite Docling's is newer than the lowest pinned release).
VISION_FAMILIES = {kind: entry for kind, entry in VISION_FAMILIES.items() if hasattr(transformers, entry[0])}


def tiny_vision_config(kind: str = "clip", **overrides):
    common = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=8,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    common.update(overrides)
    if kind == "siglip2":  # a NaFlex tower: variable-resolution patch sequences, counted in patches
        from transformers import Siglip2VisionConfig

        del common["image_size"]
        return Siglip2VisionConfig(num_patches=16, **common)
    class_name, extra = VISION_FAMILIES[kind]
    return getattr(transformers, class_name)(**{**extra, **common})


def tiny_qformer_config(vocab_size: int = 302, encoder_hidden_size: int = 32):
    from transformers import InstructBlipQFormerConfig

    return InstructBlipQFormerConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        encoder_hidden_size=encoder_hidden_size,
        vocab_size=vocab_size,
        max_position_embeddings=128,
        cross_attention_frequency=1,
    )


def tiny_model_from_configs(kind: str, **kwargs):
    """LaVIN, or CROME with a fresh Q-Former and 4 query tokens, around the tiny backbone configs (random
    weights); an image placeholder is id 300 (one past the tiny vocabulary)."""
    from mmadapters import CromeForConditionalGeneration, LavinForConditionalGeneration

    if kind == "lavin":
        return LavinForConditionalGeneration.from_backbones(
            tiny_text_config(), tiny_vision_config(), **kwargs
        )
    return CromeForConditionalGeneration.from_backbones(
        tiny_text_config(),
        tiny_vision_config(),
        qformer=tiny_qformer_config(vocab_size=300),
        num_query_tokens=4,
        **kwargs,
    )


def save_tiny_llm(path, seed: int = 0, kind: str = "llama", tokenizer=None) -> str:
    tokenizer = tokenizer or make_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_text_config(kind, vocab_size=len(tokenizer)))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def save_bare_llm_lora(llm: str, folder, seed: int, base_model: str | None = None, **config) -> str:
    """A LoRA trained (here: given random weights) on the bare LLM at `llm`, saved by PEFT; `base_model` is the
    base it names (default: `llm`), `config` LoraConfig fields over r=4, alpha 8 on q_proj / v_proj."""
    from peft import LoraConfig, get_peft_model

    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **config}
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(llm), LoraConfig(**config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    if base_model is not None:
        peft_model.peft_config["default"].base_model_name_or_path = base_model
    peft_model.save_pretrained(folder, save_embedding_layers=False)
    return str(folder)


def save_tiny_t5(path) -> str:
    """A tiny T5 (an encoder-decoder LLM for CROME) with the tiny tokenizer."""
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    model = T5ForConditionalGeneration(config)
    model.generation_config.decoder_start_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def word_level_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer whose ids differ from the tiny LLM's (InstructBLIP's Q-Former reads BERT's, not the LLM's)."""
    words = sorted({word for line in CORPUS for word in line.replace(".", " ").replace("?", " ").split()})
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


def save_tiny_instructblip(path) -> str:
    """A tiny InstructBLIP checkpoint (random weights) whose Q-Former tokenizer, in `qformer_tokenizer/` as
    transformers' InstructBlipProcessor saves it, is not the LLM's (`word_level_tokenizer`)."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    qformer_tokenizer = word_level_tokenizer()
    llm_vocabulary = len(make_tokenizer())
    config = InstructBlipConfig(
        vision_config=tiny_vision_config("instructblip", num_hidden_layers=3).to_dict(),
        qformer_config=tiny_qformer_config(vocab_size=len(qformer_tokenizer)).to_dict(),
        text_config=tiny_text_config(vocab_size=llm_vocabulary + 1).to_dict(),
        num_query_tokens=4,
        image_token_index=llm_vocabulary,
    )
    torch.manual_seed(0)
    InstructBlipForConditionalGeneration(config).save_pretrained(path)
    qformer_tokenizer.save_pretrained(os.path.join(path, "qformer_tokenizer"))
    return str(path)


def save_tiny_vision(path, seed: int = 0) -> str:
    torch.manual_seed(seed)
    config = tiny_vision_config()
    CLIPVisionModel(config).save_pretrained(path)
    CLIPImageProcessorPil(
        size={"height": 32, "width": 32},
        do_center_crop=False,
        resample=3,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    ).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory) -> tuple[str, str]:
    """Paths of a tiny Llama (with tokenizer) and a tiny CLIP vision tower (with image processor)."""
    root = tmp_path_factory.mktemp("backbones")
    return save_tiny_llm(root / "llm"), save_tiny_vision(root / "vision")


@pytest.fixture(scope="session")
def backbones_by_llm(tmp_path_factory) -> dict[str, str]:
    """Paths of tiny backbones: a decoder-only ("llama") and an encoder-decoder ("t5") LLM, and a "vision" tower."""
    root = tmp_path_factory.mktemp("backbones_by_llm")
    return {
        "llama": save_tiny_llm(root / "llama"),
        "t5": save_tiny_t5(root / "t5"),
        "vision": save_tiny_vision(root / "vision"),
    }


@pytest.fixture()
def randomize_adapters():
    """Give the zero-initialised experts random weights, so that routing and adapters matter."""

    def apply(model, seed: int = 1, std: float = 0.2):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if parameter.requires_grad and "expert" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
        return model

    return apply


def dropout_off(model):
    """No dropout anywhere (so that a training-mode pass computes what an evaluation pass does): nn.Dropout
    modules, and the float `dropout` rates some attention layers apply themselves (T5's)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "dropout", None), float):
            module.dropout = 0.0
    return model


def tiny_sample_inputs(processor):
    """A fixed batch: one image sample and one text-only sample (used across processes by the Hub tests)."""
    generator = torch.Generator().manual_seed(0)
    image = (torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return processor(
        images=[[image], []], text=["Image: <image>\nwhat color is it?", "Image: N/A\nthe capital of"]
    )


def greedy_without_cache(model, inputs, steps: int) -> torch.Tensor:
    """`steps` tokens chosen greedily after `inputs`, each by a forward over the whole sequence without a cache:
    what cached greedy generation must give (a CROME `prompt_mask` grows with the sequence)."""
    ids = inputs["input_ids"]
    for _ in range(steps):
        step = {**inputs, "input_ids": ids}
        if "prompt_mask" in inputs:
            step["prompt_mask"] = torch.ones_like(ids)
        with torch.no_grad():
            logits = model(**step, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


# --- training helpers ------------------------------------------------------------------------------------------


def save_image(folder, name, color) -> str:
    path = os.path.join(folder, name)
    Image.new("RGB", (32, 32), color).save(path)
    return path


def toy_dataset(folder, n=24):
    rng = np.random.default_rng(0)
    rows = {"prompt": [], "target": [], "image": []}
    colors = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    for i in range(n):
        if i % 3 == 2:  # text-only samples in the mixture
            rows["prompt"].append("Image: N/A\nsay hi")
            rows["target"].append(" hi")
            rows["image"].append(None)
        else:
            name = list(colors)[int(rng.integers(2))]
            rows["prompt"].append("Image: <image>\nwhat color?")
            rows["target"].append(f" {name}")
            rows["image"].append(save_image(folder, f"{i}.png", colors[name]))
    return datasets.Dataset.from_dict(rows)


def make_trainer(model, processor, dataset, output_dir, max_steps=6, training=None, **kwargs):
    """A LavinTrainer (or `trainer_class`) on `dataset`; `training` replaces TrainingArguments fields."""
    defaults = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_steps=max_steps,
        learning_rate=5e-3,
        save_steps=3,
        logging_steps=1,
        use_cpu=True,
        report_to=[],
        remove_unused_columns=False,
        seed=0,
        data_seed=0,
        weight_decay=0.02,
        dataloader_num_workers=0,
        save_only_model=False,
    )
    args = TrainingArguments(**{**defaults, **(training or {})})
    from mmadapters.trainers import LavinTrainer, VisionLanguageCollator

    trainer_class = kwargs.pop("trainer_class", LavinTrainer)
    return trainer_class(
        model=model,
        args=args,
        train_dataset=dataset,
        **{"processing_class": processor, "data_collator": VisionLanguageCollator(processor), **kwargs},
    )


def write_recipe(tmp_path, tiny_backbones, **overrides):
    """A recipe for a two-step LaVIN run on the tiny backbones (keys replaced by `overrides`)."""
    recipe = {
        "model": "lavin",
        "text_model": tiny_backbones[0],
        "vision_model": tiny_backbones[1],
        "data": {"name": "easy_vqa", "split": "train", "limit": 8},
        "output_dir": str(tmp_path / "run"),
        "training": {
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "use_cpu": True,
            "save_strategy": "no",
        },
        **overrides,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def save_llm_with_width(path, hidden_size: int = 64, **overrides) -> str:
    """bitsandbytes' CPU 4-bit kernels need input widths of at least one quantisation block (64)."""
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = tiny_text_config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, **overrides
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
