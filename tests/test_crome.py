"""CROME: adapter, stages, Q-Former path, decoder-only and encoder-decoder LLMs, checkpoints (CROME issue)."""

from __future__ import annotations

import copy
import inspect
import os
import shutil
import warnings

import pytest
import torch
from conftest import (
    VISION_FAMILIES,
    dropout_off,
    make_tokenizer,
    save_tiny_instructblip,
    tiny_qformer_config,
    tiny_text_config,
    tiny_vision_config,
    word_level_tokenizer,
)
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    EncoderRepetitionPenaltyLogitsProcessor,
    GenerationConfig,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipVisionConfig,
    LogitsProcessorList,
    T5Config,
)

from mmadapters import (
    CromeAdapterConfig,
    CromeForConditionalGeneration,
    CromeProcessor,
    ImageTokenMismatchError,
    LavinForConditionalGeneration,
    LavinProcessor,
)
from mmadapters.convert import from_instructblip
from mmadapters.modeling.adapters import CromeAdapter
from mmadapters.modeling.paper_configs import llama_7b_config, llama_13b_config
from mmadapters.modeling.transformers_compat import CACHE_KWARG, cache_of

tiny_qformer = tiny_qformer_config


@pytest.fixture(scope="module")
def backbones(backbones_by_llm):
    return backbones_by_llm


def build(backbones, kind="llama", **kwargs):
    torch.manual_seed(0)
    model = CromeForConditionalGeneration.from_backbones(
        backbones[kind], backbones["vision"], qformer=tiny_qformer(), num_query_tokens=4, **kwargs
    )
    processor = CromeProcessor.from_backbones(
        backbones[kind], backbones["vision"], num_image_tokens=model.config.num_image_tokens
    )
    return model.eval(), processor


def build_with_active_adapters(backbones, kind, randomize_adapters):
    """LaVIN (`kind` "lavin") or CROME around the `kind` LLM, with adapters that change the output, in eval mode."""
    if kind == "lavin":
        torch.manual_seed(0)
        model = LavinForConditionalGeneration.from_backbones(backbones["llama"], backbones["vision"])
        processor = LavinProcessor.from_backbones(backbones["llama"], backbones["vision"])
        return randomize_adapters(model).eval(), processor
    model, processor = build(backbones, kind)
    randomize_up(model, std=0.5)
    return model, processor


def image(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8).numpy()


def randomize_up(model, std=0.2):
    torch.manual_seed(5)
    with torch.no_grad():
        model.adapter.up.weight.normal_(0, std)


# --- parameter counts and stages (meta device, full size) ------------------------------------------------------


def test_adapter_has_exactly_5_242_880_parameters_at_d4096():
    with torch.device("meta"):
        adapter = CromeAdapter(4096, CromeAdapterConfig(bottleneck=256))
    assert sum(p.numel() for p in adapter.parameters()) == 5_242_880 == 5 * 4096 * 256


@pytest.mark.parametrize(
    "text_config",
    [
        llama_7b_config(),
        llama_13b_config(),
    ],
)
def test_stages_trainable_sets_at_full_size(text_config):
    with torch.device("meta"):
        model = CromeForConditionalGeneration.from_backbones(text_config, InstructBlipVisionConfig())
    d = text_config.hidden_size
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    trainable = lambda: sum(p.numel() for p in model.parameters() if p.requires_grad)  # noqa: E731
    # Default stage: finetune, the adapter only (about 5M at d=4096).
    assert trainable() == 5 * d * 256 == count(model.adapter)
    report = model.set_stage("pretrain")
    projections = (768 * d + d) + (1408 * d + d)
    assert trainable() == projections + 5 * d * 256
    assert report["qformer"] == 0 and report["adapter"] == 5 * d * 256
    model.set_stage("instruct")
    assert trainable() == projections + 5 * d * 256 + count(model.qformer) + 32 * 768
    model.set_stage("finetune")
    assert trainable() == 5 * d * 256
    assert not any(p.requires_grad for p in model.language_model.parameters())
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    assert model.config.stages_used == ["finetune", "pretrain", "instruct"]


def test_flan_t5_xxl_shapes():
    t5_xxl = T5Config(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, vocab_size=32128)
    with torch.device("meta"):
        model = CromeForConditionalGeneration.from_backbones(t5_xxl, InstructBlipVisionConfig())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 5_242_880


def test_unknown_stage_is_a_clear_error(backbones):
    model, _ = build(backbones)
    with pytest.raises(ValueError, match="Unknown stage 'warmup'"):
        model.set_stage("warmup")


# --- behaviour ------------------------------------------------------------------------------------------------


def reference_without_adapter(model, inputs):
    """The same pipeline with no adapter: projected visual tokens and plain prompt embeddings."""
    ids = inputs["input_ids"]
    mask = ids == model.config.image_token_id
    embeds = model.get_input_embeddings()(ids.masked_fill(mask, 0))
    visual = model.get_image_features(
        inputs["pixel_values"], inputs["qformer_input_ids"], inputs["qformer_attention_mask"]
    ).pooler_output
    embeds = embeds.masked_scatter(mask.unsqueeze(-1), visual)
    return model.language_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits


def test_zero_up_projection_equals_pipeline_without_adapter(backbones):
    model, processor = build(backbones)
    inputs = processor(images=[image(0)], text="<image>\nwhat color is the shape?")
    assert (inputs["input_ids"] == processor.image_token_id).sum() == 4 + 16  # 4 queries + 16 patches
    with torch.no_grad():
        torch.testing.assert_close(
            model(**inputs).logits, reference_without_adapter(model, inputs), rtol=0, atol=1e-6
        )
        randomize_up(model)
        assert (model(**inputs).logits - reference_without_adapter(model, inputs)).abs().max() > 1e-4


def test_text_branch_sees_prompt_tokens_only(backbones):
    model, processor = build(backbones)
    randomize_up(model)
    inputs = processor(images=[image(0)], text="<image>\nwhat color?", answers=["red"])
    mask = inputs["prompt_mask"][0]
    ids = inputs["input_ids"][0]
    assert mask[ids == processor.image_token_id].sum() == 0  # image slots are the vision branch's
    assert mask[inputs["labels"][0] != -100].sum() == 0  # answer tokens are never adapted
    assert mask.sum() == ((ids != processor.image_token_id) & (inputs["labels"][0] == -100)).sum()


def test_qformer_reads_the_instruction(backbones):
    """By default the Q-Former reads the prompt without its placeholder; `instructions` replaces it per sample (one
    row per image); the call refuses keywords it does not take, naming `instructions` among those it does."""
    _, processor = build(backbones)
    text = ["<image>\nwhat color?", "<image>\nwhat shape?"]
    default = processor(images=[[image(0)], [image(1)]], text=text)
    expected = processor.qformer_tokenizer(["what color?", "what shape?"], padding=True)["input_ids"]
    assert default["qformer_input_ids"].tolist() == expected
    given = processor(
        images=[[image(0)], [image(1)]], text=text, instructions=["name the colour", "and shape"]
    )
    expected = processor.qformer_tokenizer(["name the colour", "and shape"], padding=True)["input_ids"]
    assert given["qformer_input_ids"].tolist() == expected
    torch.testing.assert_close(given["input_ids"], default["input_ids"])  # the LLM's input is the prompt's
    with pytest.raises(TypeError, match="instruction.*it takes .*overflow, instructions"):
        processor(images=[image(0)], text=text[0], instruction="typo")
    # One string is every sample's instruction; a list needs one per prompt (a batch with one used IndexError,
    # a longer list was cut silently).
    shared = processor(images=[[image(0)], [image(1)]], text=text, instructions="name it")
    expected = processor.qformer_tokenizer(["name it", "name it"], padding=True)["input_ids"]
    assert shared["qformer_input_ids"].tolist() == expected
    for wrong in (["one"], ["a", "b", "c"], [None, "x"]):
        with pytest.raises(
            ValueError, match="instructions: one string for every sample, or a list of 2 strings"
        ):
            processor(images=[[image(0)], [image(1)]], text=text, instructions=wrong)


def test_qformer_reads_a_left_padded_instruction_as_a_right_padded_one(backbones):
    """Positions count over the instruction's real tokens: the query outputs do not depend on the padding side
    (transformers' pipeline pads its batches on the left; our processor on the right)."""
    model, processor = build(backbones)
    inputs = processor(images=[[image(0)], [image(1)]], text=["<image>\nwhat color is it?", "<image>\nshape"])
    ids, mask = inputs["qformer_input_ids"], inputs["qformer_attention_mask"]
    assert mask[1].sum() < mask.shape[1]  # the second instruction is padded
    lengths = mask.sum(dim=1)
    left_ids, left_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for row, length in enumerate(lengths.tolist()):
        left_ids[row, -length:], left_mask[row, -length:] = ids[row, :length], 1
    with torch.no_grad():
        right = model.get_image_features(inputs["pixel_values"], ids, mask).pooler_output
        left = model.get_image_features(inputs["pixel_values"], left_ids, left_mask).pooler_output
    torch.testing.assert_close(left, right, rtol=0, atol=1e-6)


def test_label_smoothing_of_an_encoder_decoder_crome_scores_the_decoder_logits_as_they_are(
    backbones, tmp_path
):
    """An encoder-decoder LLM's decoder logit t predicts labels[t] (no shift), as transformers' Seq2Seq models."""
    from conftest import make_trainer, toy_dataset

    from mmadapters.trainers import CromeTrainer

    model, processor = build(backbones, "t5")
    dropout_off(model)  # the training step must see the evaluation's function
    trainer = make_trainer(
        model,
        processor,
        toy_dataset(tmp_path, n=4),
        tmp_path / "run",
        trainer_class=CromeTrainer,
        training={"label_smoothing_factor": 0.1},
    )
    batch = processor(
        images=[[image(0)], [image(1)]],
        text=["<image>\nwhat color?", "<image>\nshape"],
        answers=["red", "a small circle"],
    )
    with torch.no_grad():
        log_probs = -torch.log_softmax(model(**batch).logits.float(), dim=-1)
        active = batch["labels"] != -100
        nll = (
            log_probs.gather(-1, batch["labels"].clamp(min=0).unsqueeze(-1)).squeeze(-1)[active].sum()
            / active.sum()
        )
        smooth = log_probs.sum(-1)[active].sum() / (active.sum() * log_probs.shape[-1])
        evaluation_loss = trainer.compute_loss(model, dict(batch))
        model.train()
        training_loss = trainer.compute_loss(model, dict(batch))
    torch.testing.assert_close(evaluation_loss, 0.9 * nll + 0.1 * smooth, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        training_loss, 0.9 * nll + 0.1 * smooth, rtol=1e-4, atol=1e-5
    )  # T5's train mode


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_training_steps_lower_the_loss(backbones, kind):
    model, processor = build(backbones, kind)
    with torch.no_grad():  # a random tiny LLM's logits are nearly flat: make its output layer decisive
        model.language_model.get_output_embeddings().weight.mul_(6)
    model.set_stage("pretrain")
    model.train()
    batch = processor(
        images=[[image(0)], [image(1)]],
        text=["<image>\nwhat color?", "<image>\nwhat shape?"],
        answers=["red", "circle"],
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(**batch).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] * 0.9, losses


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_peft_task_wrappers_run_crome_as_the_model_itself(backbones, kind):
    """`get_peft_model(..., LoraConfig(task_type="CAUSAL_LM" / "SEQ_2_SEQ_LM"))`, as most LoRA recipes write it: the
    task wrapper passes `inputs_embeds=None` with the ids, which reached the LLM beside our own embeddings (a
    TypeError, "multiple values"). Loss and greedy answers equal the inner model's; embeddings given instead of ids
    are refused with the reason."""
    import inspect

    from peft import LoraConfig, PeftModelForSeq2SeqLM, get_peft_model

    if kind == "t5" and "_prepare_encoder_decoder_kwargs" in inspect.getsource(
        PeftModelForSeq2SeqLM.__init__
    ):
        pytest.skip(
            "this PEFT's SEQ_2_SEQ_LM wrapper needs a method transformers 5 removed (a plain T5 fails too)"
        )
    model, processor = build(backbones, kind)
    randomize_up(model)
    task = "SEQ_2_SEQ_LM" if kind == "t5" else "CAUSAL_LM"
    targets = r".*language_model.*\.(q|q_proj)"
    config = LoraConfig(r=2, target_modules=targets, init_lora_weights=False, task_type=task)
    peft_model = get_peft_model(model, config).eval()
    batch = processor(
        images=[[image(0)], []], text=["<image>\nwhat color?", "hello there"], answers=["red", "blue"]
    )
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).loss, model(**batch).loss)
    prompts = processor(images=[[image(0)], []], text=["<image>\nwhat color?", "hello there"])
    greedy = dict(max_new_tokens=3, do_sample=False)
    assert torch.equal(peft_model.generate(**prompts, **greedy), model.generate(**prompts, **greedy))
    embeddings = model.get_input_embeddings()(prompts["input_ids"].clamp(max=len(processor.tokenizer) - 2))
    for call in (
        lambda: model(**prompts, inputs_embeds=embeddings),
        lambda: model.generate(**prompts, inputs_embeds=embeddings),
    ):
        with pytest.raises(ValueError, match="CROME takes input_ids, not inputs_embeds"):
            call()


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_adapter_only_round_trip(backbones, kind, tmp_path):
    model, processor = build(backbones, kind)
    randomize_up(model)
    model.save_pretrained(tmp_path, processor=processor)
    saved = set(model.adapter_state_dict())
    assert {k.split(".")[0] for k in saved} == {
        "adapter",
        "patch_projection",
        "qformer",
        "query_projection",
        "query_tokens",
    }
    loaded = CromeForConditionalGeneration.from_pretrained(tmp_path)
    batch = processor(images=[[image(0)], []], text=["<image>\nwhat color?", "hello there"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    assert isinstance(AutoModelForImageTextToText.from_pretrained(tmp_path), CromeForConditionalGeneration)
    assert isinstance(AutoProcessor.from_pretrained(tmp_path), CromeProcessor)


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_batched_generation_equals_one_by_one_and_vision_runs_once(backbones, kind):
    model, processor = build(backbones, kind)
    randomize_up(model, std=0.5)
    prompts = ["<image>\nwhat color is the shape?", "the capital of france", "<image>\nwhat shape"]
    images = [[image(0)], [], [image(1)]]
    batch = processor(images=images, text=prompts)
    calls = []
    model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    batched = model.generate(**batch, **kwargs)
    assert len(calls) == 1
    offset = 0 if kind == "t5" else batch["input_ids"].shape[1]
    for i in range(3):
        single = processor(images=images[i] or None, text=prompts[i])
        alone = model.generate(**single, **kwargs)
        alone_offset = 0 if kind == "t5" else single["input_ids"].shape[1]
        assert (
            batched[i, offset:].tolist()[: kwargs["max_new_tokens"] + 1]
            == alone[0, alone_offset:].tolist()[: kwargs["max_new_tokens"] + 1]
        )


def log_prob_of_continuation(model, inputs, sequence, new_tokens):
    """The summed log-probability of the last `new_tokens` tokens of `sequence` (prompt + continuation of
    `inputs`' single sample), from one forward pass."""
    grown = sequence.shape[0] - inputs["input_ids"].shape[1]
    step = {**inputs, "input_ids": sequence[None]}
    for name in ("attention_mask", "prompt_mask"):
        if name in inputs:
            fill = 1 if name == "attention_mask" else 0
            step[name] = torch.nn.functional.pad(inputs[name], (0, grown), value=fill)
    with torch.no_grad():
        log_probs = model(**step).logits[0, -new_tokens - 1 : -1].float().log_softmax(-1)
    return log_probs.gather(-1, sequence[-new_tokens:, None]).sum()


@pytest.mark.parametrize("kind", ["lavin", "llama"])
def test_beam_search_keeps_each_samples_images(backbones, kind, randomize_adapters):
    """Beam search / num_return_sequences repeat every sample; a sample's image group must be repeated whole
    ([A, B] -> [A, B, A, B, ...]), not image by image, or a beam would see another copy's images. Each returned
    beam's score is the log-probability a forward pass with its own images gives it, and a batch's beams are each
    sample's beams alone. (An encoder-decoder CROME places the images before the LLM's generate repeats rows.)"""
    model, processor = build_with_active_adapters(backbones, kind, randomize_adapters)
    prompts = ["<image> then <image>\nwhat changed?", "<image>\nwhat shape", "the capital of france"]
    images = [[image(0), image(1)], [image(2)], []]
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False)
    kwargs.update(
        return_dict_in_generate=True, output_scores=True, length_penalty=0.0
    )  # score = sum of log-probs
    batched = model.generate(**processor(images=images, text=prompts), **kwargs)
    for i in range(3):
        inputs = processor(images=images[i] or None, text=prompts[i])
        alone = model.generate(**inputs, **kwargs)
        for sequence, score in zip(alone.sequences, alone.sequences_scores, strict=True):
            torch.testing.assert_close(
                log_prob_of_continuation(model, inputs, sequence, 4), score, atol=1e-4, rtol=0
            )
        rows = slice(2 * i, 2 * i + 2)
        assert batched.sequences[rows, -4:].tolist() == alone.sequences[:, -4:].tolist()
        torch.testing.assert_close(batched.sequences_scores[rows], alone.sequences_scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["lavin", "llama", "t5"])
def test_prompt_reading_generation_options_skip_the_image_placeholders(backbones, kind, randomize_adapters):
    """generate's `encoder_repetition_penalty` and `encoder_no_repeat_ngram_size` index the logits with the prompt's
    ids, image placeholders (outside the vocabulary) included: both stopped with torch's "index ... is out of
    bounds". They now treat the prompt's text tokens as transformers does and skip the placeholders: the penalty
    equals transformers' given the prompt's text tokens alone, and no generated bigram repeats one of the prompt's
    (the prompt ends with the token that precedes its image, a space, whose successor is a placeholder). A CROME around T5
    refuses them (its LLM gets embeddings, not ids)."""
    model, processor = build_with_active_adapters(backbones, kind, randomize_adapters)
    inputs = processor(images=[image(0)], text="what is <image> here? what is ")
    if kind == "t5":
        # its LLM gets embeddings: transformers has no prompt ids and ignored the option (a warning); now refused
        for option in (dict(encoder_repetition_penalty=3.0), dict(encoder_no_repeat_ngram_size=2)):
            with pytest.raises(ValueError, match="not supported by a CROME around an encoder-decoder LLM"):
                model.generate(**inputs, **option)
            with pytest.raises(ValueError, match=f"{next(iter(option))} is not supported"):
                model.generate(**inputs, generation_config=GenerationConfig(**option))
        assert model.generate(**inputs, max_new_tokens=2, encoder_repetition_penalty=1.0).shape[1] > 1
        return
    ids = inputs["input_ids"]
    text_ids = ids[ids != processor.image_token_id][None]
    greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    penalised = model.generate(**inputs, encoder_repetition_penalty=3.0, **greedy)
    by_hand = LogitsProcessorList([EncoderRepetitionPenaltyLogitsProcessor(3.0, text_ids)])
    assert torch.equal(penalised, model.generate(**inputs, logits_processor=by_hand, **greedy))
    assert not torch.equal(penalised, model.generate(**inputs, **greedy))  # the penalty changes the answer

    sequence = model.generate(**inputs, encoder_no_repeat_ngram_size=2, **greedy)[0].tolist()
    prompt = ids[0].tolist()
    prompt_bigrams = set(zip(prompt[:-1], prompt[1:], strict=True))
    generated = set(zip(sequence[len(prompt) - 1 : -1], sequence[len(prompt) :], strict=True))
    assert len(sequence) == len(prompt) + 6 and not generated & prompt_bigrams


@pytest.mark.parametrize("kind", ["lavin", "llama", "t5"])
def test_token_healing_is_refused_up_front(backbones, kind, randomize_adapters):
    """transformers' token healing decodes the prompts to text and tokenizes them again: the image placeholders
    (outside the vocabulary) were dropped, and generation stopped on the image count (LaVIN), on a prompt_mask /
    attention_mask of the old length (CROME) or in torch's reshape (T5 CROME). Refused, as an option or in a
    generation config."""
    model, processor = build_with_active_adapters(backbones, kind, randomize_adapters)
    inputs = processor(images=[[image(0)], []], text=["what is <image> here?", "the capital of"])
    with pytest.raises(ValueError, match=r"token_healing is not supported by [\w -]+: it"):
        model.generate(**inputs, max_new_tokens=2, token_healing=True, tokenizer=processor.tokenizer)
    config = GenerationConfig(max_new_tokens=2, token_healing=True)
    with pytest.raises(ValueError, match="token_healing is not supported"):
        model.generate(**inputs, generation_config=config, tokenizer=processor.tokenizer)
    assert model.generate(**inputs, max_new_tokens=2, token_healing=False).shape[0] == 2


@pytest.mark.parametrize("kind", ["lavin", "llama", "t5"])
def test_negative_prompt_guidance(backbones, kind, randomize_adapters):
    """Classifier-free guidance with `negative_prompt_ids`: a decoder-only model's first scores equal transformers'
    formula on its own forward passes (the prompt with its image, and the negative prompt as text); a T5 CROME
    refuses it (transformers stopped with "You must specify exactly one of input_ids or inputs_embeds")."""
    model, processor = build_with_active_adapters(backbones, kind, randomize_adapters)
    inputs = processor(images=[[image(0)], []], text=["what is <image> here?", "the capital of"])
    negative = processor.tokenizer(["nothing at all", "nothing at all"], return_tensors="pt").input_ids
    if kind == "t5":
        with pytest.raises(
            ValueError, match="negative_prompt_ids is not supported by a CROME around an encoder"
        ):
            model.generate(**inputs, negative_prompt_ids=negative, guidance_scale=1.5)
        return
    out = model.generate(
        **inputs,
        negative_prompt_ids=negative,
        guidance_scale=1.5,
        max_new_tokens=1,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        conditional = model(**inputs).logits[:, -1].log_softmax(-1)
        unconditional = model(input_ids=negative).logits[:, -1].log_softmax(-1)
    torch.testing.assert_close(out.scores[0], 1.5 * (conditional - unconditional) + unconditional)


@pytest.mark.parametrize("kind", ["lavin", "llama"])
def test_continuous_batching_is_refused_up_front(backbones, kind, randomize_adapters):
    """transformers' continuous batching runs bare token lists through a paged cache: the models' forward failed on
    it inside transformers' worker, which logged the error and returned an empty answer per request."""
    model, processor = build_with_active_adapters(backbones, kind, randomize_adapters)
    ids = processor(text="hello there")["input_ids"][0].tolist()
    config = GenerationConfig(max_new_tokens=3, do_sample=False)
    with pytest.raises(NotImplementedError, match="continuous batching .* Use generate"):
        model.generate_batch([ids], generation_config=config, progress_bar=False, warmup=False)
    with pytest.raises(NotImplementedError, match="continuous batching"):
        model.init_continuous_batching()


@pytest.mark.parametrize("kind", ["lavin", "llama", "t5"])
def test_static_cache_stop_strings_and_streamers_work_as_in_transformers(backbones, kind, randomize_adapters):
    """The README's generation options: a static cache gives greedy's tokens, `stop_strings` ends the answer at
    the first token that completes the string, and a streamer gets the prompt (decoder-only; an encoder-decoder:
    the decoder's start token) and then each new token as generated."""
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    model, processor = build_with_active_adapters(backbones, kind, randomize_adapters)
    inputs = processor(images=[image(0)], text="<image>\nwhat color is the shape?")
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    greedy = model.generate(**inputs, **kwargs)
    start = 0 if kind == "t5" else inputs["input_ids"].shape[1]  # a T5 CROME returns the decoder's tokens
    answer = greedy[0, start:].tolist()
    assert model.generate(**inputs, **kwargs, cache_implementation="static").tolist() == greedy.tolist()

    # The first new token (after the first two) whose text is a plain word stops the answer there.
    pieces = [processor.decode([token]) for token in answer]
    at = next(i for i, text in enumerate(pieces) if i >= 2 and text.strip().isalpha() and text.isascii())
    stopped = model.generate(
        **inputs, max_new_tokens=8, do_sample=False, stop_strings=[pieces[at]], tokenizer=processor.tokenizer
    )
    first = pieces.index(pieces[at])  # the same text may come earlier
    assert stopped[0, start:].tolist() == answer[: first + 1]

    streamer = Collect()
    assert model.generate(**inputs, **kwargs, streamer=streamer).tolist() == greedy.tolist()
    prompt = (
        [model.config.get_text_config().decoder_start_token_id] if kind == "t5" else inputs["input_ids"][0]
    )
    assert streamer.puts[0] == list(prompt) and streamer.ended
    assert [token for put in streamer.puts[1:] for token in put] == (answer[1:] if kind == "t5" else answer)


@pytest.mark.parametrize("kind", ["lavin", "llama"])
def test_assisted_generation_gives_the_assistant_the_images_and_greedy_answers(
    backbones, kind, randomize_adapters
):
    """generate(assistant_model=...): the assistant's first round is not transformers' "first iteration", which
    drops pixel_values; it must still see the images (its vision tower runs), and the answer is greedy's."""
    model, processor = build_with_active_adapters(backbones, kind, randomize_adapters)
    assistant, _ = build_with_active_adapters(backbones, kind, randomize_adapters)
    calls = []
    assistant.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    inputs = processor(images=[image(0)], text="<image>\nwhat color is the shape?")
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    greedy = model.generate(**inputs, **kwargs)
    assert model.generate(**inputs, **kwargs, assistant_model=assistant).tolist() == greedy.tolist()
    assert len(calls) == 1
    assert model.generate(**inputs, **kwargs, prompt_lookup_num_tokens=2).tolist() == greedy.tolist()


@pytest.mark.parametrize("kind", ["lavin", "llama", "t5"])
def test_an_assistant_that_cannot_take_the_inputs_is_refused_up_front(backbones, kind, randomize_adapters):
    model, processor = build_with_active_adapters(backbones, kind, randomize_adapters)
    inputs = processor(images=[image(0)], text="<image>\nwhat color is the shape?")
    plain_llm = AutoModelForCausalLM.from_pretrained(backbones["llama"])
    with pytest.raises(
        TypeError, match="assistant_model must be a .*ForConditionalGeneration too.*LlamaForCausalLM"
    ):
        model.generate(**inputs, max_new_tokens=2, assistant_model=plain_llm)
    if kind == "t5":
        with pytest.raises(
            ValueError, match="decoder-only LLM.*encoder-decoder \\(t5\\).*prompt_lookup_num_tokens"
        ):
            model.generate(**inputs, max_new_tokens=2, assistant_model=model)


@pytest.mark.parametrize("kind", ["lavin", "llama", "t5"])
def test_transformers_forward_keywords_are_honoured(backbones, kind):
    """The options every transformers model takes through **kwargs, as LLaVA's forward does: `return_dict=False`
    returns the tuple, `use_cache` reaches the LLM, the KV cache is accepted under its old name too."""
    if kind == "lavin":
        model = LavinForConditionalGeneration.from_backbones(backbones["llama"], backbones["vision"]).eval()
        processor = LavinProcessor.from_backbones(backbones["llama"], backbones["vision"])
    else:
        model, processor = build(backbones, kind)
    assert not {"use_cache", "return_dict", "past_key_values"} & set(
        inspect.signature(model.forward).parameters
    )
    batch = processor(images=[[image(0)]], text=["<image>\nwhat color?"])
    with torch.no_grad():
        output = model(**batch)
        as_tuple = model(**batch, return_dict=False)
        assert isinstance(as_tuple, tuple)
        torch.testing.assert_close(as_tuple[0], output.logits, rtol=0, atol=0)
        assert cache_of(model(**batch, use_cache=False)) is None
        cache = cache_of(model(**batch, use_cache=True))
        assert cache is not None
        if kind == "t5":
            return  # the encoder input is always the whole prompt: nothing to continue
        next_token = output.logits[:, -1:].argmax(-1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(next_token)], dim=1)
        step = dict(input_ids=next_token, attention_mask=mask)
        with_cache = model(**step, cache=copy.deepcopy(cache)).logits
        old_name = "past_key_values"
        expected = (
            [FutureWarning] if CACHE_KWARG == "cache" else []
        )  # renamed to `cache` in transformers 5.24
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with_old_name = model(**step, **{old_name: copy.deepcopy(cache)}).logits
        assert [w.category for w in caught if "past_key_values" in str(w.message)] == expected
        torch.testing.assert_close(with_old_name, with_cache, rtol=0, atol=0)
        full = processor(images=[[image(0)]], text=["<image>\nwhat color?"])
        full["input_ids"] = torch.cat([full["input_ids"], next_token], dim=1)
        full["attention_mask"] = mask
        torch.testing.assert_close(with_cache[:, -1], model(**full).logits[:, -1], rtol=1e-4, atol=1e-5)


def test_bad_inputs(backbones):
    model, processor = build(backbones)
    with pytest.raises(ImageTokenMismatchError, match="Got 2 image"):
        processor(images=[image(0), image(1)], text="<image>\nwhat?")
    inputs = processor(images=[image(0)], text="<image>\nwhat?")
    with pytest.raises(ValueError, match="qformer_input_ids"):
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
    with pytest.raises(ImageTokenMismatchError, match="no pixel_values"):
        model(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match="Prompt 0 is empty"):
        processor(text=[""])


QFORMER_CASES = {
    # Before: torch's "Sizes of tensors must match except in dimension 1" from inside the Q-Former's attention.
    "one instruction per sample, not per image": (
        lambda b: {
            **b,
            "qformer_input_ids": b["qformer_input_ids"].repeat(2, 1),
            "qformer_attention_mask": None,
        },
        "qformer_input_ids has 2 rows but pixel_values 1 image",
    ),
    "a mask of another shape": (
        lambda b: {**b, "qformer_attention_mask": b["qformer_attention_mask"][:, :-1]},
        "qformer_attention_mask has shape",
    ),
    "float ids": (lambda b: {**b, "qformer_input_ids": b["qformer_input_ids"].float()}, "integer token ids"),
    "1-D ids": (
        lambda b: {**b, "qformer_input_ids": b["qformer_input_ids"][0], "qformer_attention_mask": None},
        "must be 2-D \\(num_images, instruction length\\)",
    ),
    # Before: an IndexError from the Q-Former's position embeddings (a processor built with a qformer_max_length
    # beyond them).
    "longer than the Q-Former's positions": (
        lambda b: {
            **b,
            "qformer_input_ids": torch.ones(1, 200, dtype=torch.long),
            "qformer_attention_mask": torch.ones(1, 200, dtype=torch.long),
        },
        "200 tokens long, but the Q-Former reads at most 128 \\(its max_position_embeddings\\)",
    ),
    # Before: an IndexError from the Q-Former's word embeddings.
    "ids outside the Q-Former vocabulary": (
        lambda b: {**b, "qformer_input_ids": b["qformer_input_ids"] + 10_000},
        "outside the Q-Former's vocabulary",
    ),
}


@pytest.mark.parametrize("case", sorted(QFORMER_CASES))
def test_malformed_qformer_inputs_are_named(backbones, case):
    model, processor = build(backbones)
    batch = dict(processor(images=[image(0)], text="<image>\nwhat color?"))
    change, message = QFORMER_CASES[case]
    bad = change(batch)
    with pytest.raises(ValueError, match=message):
        model(**bad)
    with pytest.raises(ValueError, match=message):
        model.generate(**bad, max_new_tokens=2)
    pixels = {
        k: v for k, v in bad.items() if k in ("pixel_values", "qformer_input_ids", "qformer_attention_mask")
    }
    with pytest.raises(ValueError, match=message):
        model.get_image_features(**pixels)


def test_a_processor_whose_instructions_outgrow_the_qformer_is_refused_before_training(backbones, tmp_path):
    """A Trainer (or a save) given a processor that cuts instructions beyond the Q-Former's positions: before, the
    run stopped inside the Q-Former at the first long sample."""
    model, _ = build(backbones)
    processor = CromeProcessor.from_backbones(
        backbones["llama"],
        backbones["vision"],
        num_image_tokens=model.config.num_image_tokens,
        qformer_max_length=300,
    )
    with pytest.raises(ValueError, match="qformer_max_length=300 tokens, but the Q-Former reads at most 128"):
        model.save_pretrained(tmp_path / "ckpt", processor=processor)
    assert not (tmp_path / "ckpt").exists()


def test_get_image_features_names_malformed_images(backbones):
    """Before: the vision tower's "not enough values to unpack" was preceded by a misleading count of Q-Former rows
    (a 3-D image was taken as 3 images)."""
    model, _ = build(backbones)
    instruction = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="pixel_values must be \\(num_images, 3, height, width\\)"):
        model.get_image_features(torch.randn(3, 32, 32), instruction)
    with pytest.raises(ValueError, match="pixel_values must be floating point"):
        model.get_image_features(torch.ones(1, 3, 32, 32, dtype=torch.long), instruction)


@pytest.mark.parametrize("kind", ["lavin", "llama", "t5"])
def test_other_models_image_inputs_are_refused_not_dropped(backbones, kind, randomize_adapters):
    """Keywords of other vision-language models (LLaVA's `vision_feature_layer`, other processors' `image_sizes`) and
    the other method's inputs (CROME's Q-Former instruction given to LaVIN, LaVIN's `modality` to CROME) went on to
    the LLM, which ignored them: the answer came without them. Given as None (as TRL passes absent ones), taken."""
    model, processor = build_with_active_adapters(backbones, kind, randomize_adapters)
    inputs = processor(images=[image(0)], text="<image>\nwhat color?")
    other_method = (
        {"modality": torch.ones(1, dtype=torch.long)}
        if kind != "lavin"
        else {"prompt_mask": inputs["attention_mask"]}
    )
    with torch.no_grad():
        plain = model(**inputs).logits
        for given in ({"vision_feature_layer": -2}, {"image_sizes": torch.tensor([[32, 32]])}, other_method):
            name = next(iter(given))
            with pytest.raises(TypeError, match=f"does not take {name}: .*Processor.from_model"):
                model(**inputs, **given)
            with pytest.raises((TypeError, ValueError), match=name):  # generate: transformers' check or ours
                model.generate(**inputs, **given, max_new_tokens=2)
        torch.testing.assert_close(model(**inputs, image_sizes=None, vision_feature_layer=None).logits, plain)


@pytest.mark.parametrize("kind", ["lavin", "llama"])
def test_logits_to_keep_that_drops_labelled_positions_is_refused_with_labels(
    backbones, kind, randomize_adapters
):
    """The loss needs a logit for every labelled position: transformers' loss stopped with torch's "Expected input
    batch_size (2) to match target batch_size (26)". Without labels, or keeping every position, it is honoured."""
    model, processor = build_with_active_adapters(backbones, kind, randomize_adapters)
    batch = processor(
        images=[[image(0)], []], text=["<image>\nwhat color?", "hello there"], answers=["red", "blue"]
    )
    length = batch["input_ids"].shape[1]
    with torch.no_grad():
        full = model(**batch)
        for keep in (1, torch.tensor([0, 1])):
            with pytest.raises(
                ValueError, match="logits_to_keep=.* with labels: .*supervised_logits_only=True"
            ):
                model(**batch, logits_to_keep=keep)
        torch.testing.assert_close(model(**batch, logits_to_keep=length).loss, full.loss)
        last = model(**{k: v for k, v in batch.items() if k != "labels"}, logits_to_keep=1).logits
    torch.testing.assert_close(last, full.logits[:, -1:])


@pytest.mark.parametrize(
    "option",
    [
        {"position_ids": torch.arange(4).unsqueeze(0)},
        {"logits_to_keep": 1},
        {"logits_to_keep": torch.tensor([0, 1])},
        {"shift_labels": torch.zeros(1, 4, dtype=torch.long)},
    ],
    ids=["position_ids", "logits_to_keep", "logits_to_keep_tensor", "shift_labels"],
)
def test_encoder_decoder_refuses_decoder_only_options(backbones, option):
    """T5 CROME has no use for them: refused before anything runs, never dropped."""
    model, processor = build(backbones, "t5")
    inputs = processor(images=[image(0)], text="<image>\nwhat?", answers=["red"])
    calls = []
    model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=f"{next(iter(option))} apply to a decoder-only LLM.*T5"):
        model(**inputs, **option)
    assert calls == []
    assert model(**inputs).loss is not None


@pytest.mark.parametrize(
    "decoder_input_ids",
    [torch.ones(3, 1, dtype=torch.long), torch.ones(1, dtype=torch.long), torch.ones(1, 1)],
)
def test_encoder_decoder_names_malformed_decoder_input_ids(backbones, decoder_input_ids):
    """Before: a size mismatch from inside T5's attention (another batch), or an error from its embedding."""
    model, processor = build(backbones, "t5")
    inputs = processor(images=[image(0)], text="<image>\nwhat?")
    calls = []
    model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="decoder_input_ids has shape .* but must be \\(1, answer length\\)"):
        model(**inputs, decoder_input_ids=decoder_input_ids)
    assert calls == []  # refused before anything ran
    good = model(**inputs, decoder_input_ids=torch.zeros(1, 2, dtype=torch.long))
    assert good.logits.shape[:2] == (1, 2)


@pytest.mark.parametrize("option", ["decoder_input_ids", "decoder_attention_mask"])
def test_decoder_only_refuses_encoder_decoder_options(backbones, option):
    """A decoder-only CROME has no decoder inputs apart from input_ids: refused before anything runs (they were
    dropped silently, so a caller's teacher-forced decoder sequence was never read)."""
    model, processor = build(backbones)
    inputs = processor(images=[image(0)], text="<image>\nwhat?")
    calls = []
    model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=f"{option} apply to an encoder-decoder LLM.*decoder-only"):
        model(**inputs, **{option: torch.ones(1, 2, dtype=torch.long)})
    assert calls == []


@pytest.mark.parametrize(
    "kind",
    sorted(set(VISION_FAMILIES) - {"instructblip"}),  # InstructBLIP's tower: the InstructBLIP tests below
)
def test_patch_branch_reads_the_patches_of_towers_with_and_without_cls_and_registers(kind):
    """The patch branch takes the tower's patch tokens, after its CLS and register tokens. Before: DINOv2 with
    registers gave 4 tokens per image too many, and masked_scatter silently filled each image's placeholders
    with the tokens of the images before it; AIMv2 (no CLS) lost a patch and stopped inside masked_scatter."""
    torch.manual_seed(0)
    model = CromeForConditionalGeneration.from_backbones(
        tiny_text_config(),
        tiny_vision_config(kind),
        qformer=tiny_qformer_config(vocab_size=300),
        num_query_tokens=4,
    ).eval()
    pixels, instruction = torch.randn(2, 3, 32, 32), torch.tensor([[1, 5], [1, 6]])
    with torch.no_grad():
        output = model.get_image_features(pixels, instruction, output_hidden_states=True)
        tower_patches = output.hidden_states[model.config.vision_feature_layer][
            :, -model.config.num_patches :
        ]
    tokens = output.pooler_output
    assert tokens.shape[1] == model.config.num_image_tokens == 4 + 16
    torch.testing.assert_close(tokens[:, 4:], model.patch_projection(tower_patches))
    placeholders = [1] + [model.config.image_token_id] * model.config.num_image_tokens + [5, 6]
    with torch.no_grad():
        together = model(
            input_ids=torch.tensor([placeholders] * 2), pixel_values=pixels, qformer_input_ids=instruction
        ).logits
        alone = model(
            input_ids=torch.tensor([placeholders]), pixel_values=pixels[1:], qformer_input_ids=instruction[1:]
        ).logits
    torch.testing.assert_close(together[1], alone[0], rtol=1e-4, atol=1e-5)


def test_images_of_another_size_than_the_towers_config_are_named():
    """DINOv2 interpolates its position embeddings to any image size, so 64-pixel images give 64 patches where
    the config (image_size=32, patch size 8) and the processor's placeholders count 16. Before: masked_scatter
    silently took the first tokens."""
    model = CromeForConditionalGeneration.from_backbones(
        tiny_text_config(),
        tiny_vision_config("dinov2"),
        qformer=tiny_qformer_config(vocab_size=300),
        num_query_tokens=4,
    )
    with pytest.raises(ValueError, match="65 tokens per image.*1 before the patches \\+ 16 patches.*32x32"):
        model.get_image_features(torch.randn(1, 3, 64, 64), torch.tensor([[1, 5]]))


# --- InstructBLIP initialisation ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def instructblip_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("instructblip")
    tokenizer = make_tokenizer()
    vision = tiny_vision_config("instructblip", num_hidden_layers=3)
    config = InstructBlipConfig(
        vision_config=vision.to_dict(),
        qformer_config=tiny_qformer(vocab_size=len(tokenizer)).to_dict(),
        text_config=tiny_text_config(vocab_size=len(tokenizer) + 1).to_dict(),
        num_query_tokens=4,
        image_token_index=len(tokenizer),
    )
    torch.manual_seed(0)
    model = InstructBlipForConditionalGeneration(config)
    with torch.no_grad():
        model.query_tokens.normal_()
    model.save_pretrained(path)
    tokenizer.save_pretrained(os.path.join(path, "qformer_tokenizer"))
    return str(path), model.eval()


def test_from_instructblip_qformer_outputs_equal(backbones, instructblip_checkpoint, tmp_path):
    path, reference = instructblip_checkpoint
    model, processor = from_instructblip(path, text_model=backbones["llama"])
    model.eval()
    assert model.config.qformer_source["modules"] == [
        "qformer",
        "query_tokens",
        "query_projection",
    ]  # widths match
    inputs = processor(images=[image(0)], text="<image>\nwhat color is the shape?")
    with torch.no_grad():
        ours = model.query_projection.weight.new_zeros(0)
        vision = model.vision_tower(pixel_values=inputs["pixel_values"]).last_hidden_state
        queries = model.query_tokens.expand(1, -1, -1)
        mask = torch.cat([torch.ones(1, 4, dtype=torch.long), inputs["qformer_attention_mask"]], dim=1)
        ours = model.qformer(
            input_ids=inputs["qformer_input_ids"],
            attention_mask=mask,
            query_embeds=queries,
            encoder_hidden_states=vision,
        ).last_hidden_state[:, :4]
        theirs = reference.get_image_features(
            pixel_values=inputs["pixel_values"],
            qformer_input_ids=inputs["qformer_input_ids"],
            qformer_attention_mask=inputs["qformer_attention_mask"],
        )
        theirs_queries = theirs.qformer_outputs.last_hidden_state[:, :4]
        torch.testing.assert_close(ours, theirs_queries, rtol=0, atol=1e-6)
        # And the projected query tokens equal InstructBLIP's language projection of them.
        features = model.get_image_features(
            inputs["pixel_values"], inputs["qformer_input_ids"], inputs["qformer_attention_mask"]
        ).pooler_output
        torch.testing.assert_close(
            features[:, :4], reference.language_projection(theirs_queries), rtol=0, atol=1e-6
        )

    # A finetune-only checkpoint stores the adapter and the patch projection (which InstructBLIP lacks), and
    # reads the Q-Former back from the InstructBLIP checkpoint.
    randomize_up(model)
    model.save_pretrained(tmp_path, processor=processor)
    assert {k.split(".")[0] for k in model.adapter_state_dict()} == {"adapter", "patch_projection"}
    loaded = CromeForConditionalGeneration.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    # After an instruct stage, the Q-Former travels with the checkpoint.
    model.set_stage("instruct")
    assert "qformer" in {k.split(".")[0] for k in model.adapter_state_dict()}


def test_chat_template_and_pipeline(backbones, tmp_path):
    from PIL import Image
    from transformers import pipeline

    model, processor = build(backbones)
    randomize_up(model)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color?"}]}]
    assert (
        processor.apply_chat_template(chat, add_generation_prompt=True)
        == "<|user|><image>\nwhat color?</s><|assistant|>"
    )
    text_chat = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    assert (
        processor.apply_chat_template(text_chat, add_generation_prompt=True)
        == "<|user|>hello</s><|assistant|>"
    )
    model.save_pretrained(tmp_path, processor=processor)
    image_path = str(tmp_path / "image.png")
    Image.fromarray(image(2)).save(image_path)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image_path}, {"type": "text", "text": "what color?"}],
        }
    ]
    pipe = pipeline("image-text-to-text", model=str(tmp_path))
    result = pipe(
        text=messages, max_new_tokens=4, generate_kwargs={"do_sample": False}, return_full_text=False
    )
    inputs = processor(
        images=[image_path], text=processor.apply_chat_template(messages, add_generation_prompt=True)
    )
    direct = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    expected = processor.decode(direct[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert result[0]["generated_text"] == expected


@pytest.mark.parametrize("kind", ["lavin", "llama", "t5"])
def test_pipeline_batches_equal_one_by_one(backbones, kind, tmp_path, randomize_adapters):
    """pipeline(..., batch_size=3) pads each batch with the tokenizer's padding side: left, as generation needs
    (it was right: the batched answers differed). CROME's Q-Former counts positions over the instruction's real
    tokens, so a left-padded instruction reads as the processor's right-padded one."""
    from PIL import Image
    from transformers import pipeline

    model, processor = build_with_active_adapters(backbones, kind, randomize_adapters)
    model.save_pretrained(tmp_path, processor=processor)
    questions = ["what color is the shape?", "what shape", "does the image contain a triangle?"]
    messages = []  # prompts of different lengths (a pipeline batch cannot mix image and text-only samples)
    for index, question in enumerate(questions):
        Image.fromarray(image(index)).save(tmp_path / f"{index}.png")
        content = [
            {"type": "image", "image": str(tmp_path / f"{index}.png")},
            {"type": "text", "text": question},
        ]
        messages.append([{"role": "user", "content": content}])
    pipe = pipeline("image-text-to-text", model=str(tmp_path))

    def options() -> dict:  # fresh each call: transformers 5.20's pipeline writes into generate_kwargs
        return dict(max_new_tokens=4, generate_kwargs={"do_sample": False}, return_full_text=False)

    alone = [pipe(text=chat, **options())[0]["generated_text"] for chat in messages]
    batched = [result[0]["generated_text"] for result in pipe(text=messages, batch_size=3, **options())]
    assert batched == alone


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_sample_lengths_are_the_built_samples_lengths_without_the_images(backbones, kind):
    """An encoder-decoder CROME's sample is its prompt (with the tokenizer's EOS): the answer goes to the decoder."""
    _, processor = build(backbones, kind)
    texts = ["<image>\nwhat color is it?", "say hi"]
    answers = ["red", "hi there, my friend, how are you"]
    built = processor(images=[[image(0)], []], text=texts, answers=answers)["attention_mask"].sum(-1).tolist()
    assert processor.sample_lengths(texts, answers) == built
    assert (processor.sample_lengths(texts, ["a", "b"]) == built) == (kind == "t5")
    assert processor.sample_lengths(texts, answers, max_length=5, overflow="truncate_left") == [
        min(n, 5) for n in built
    ]


def test_processor_round_trip_keeps_both_tokenizers(backbones, tmp_path):
    _, processor = build(backbones)
    processor.save_pretrained(tmp_path)
    loaded = CromeProcessor.from_pretrained(tmp_path)
    a = processor(images=[image(0)], text="<image>\nwhat color?")
    b = loaded(images=[image(0)], text="<image>\nwhat color?")
    for key in ("input_ids", "prompt_mask", "qformer_input_ids", "pixel_values"):
        assert torch.equal(a[key], b[key]), key


def test_convert_instructblip_command(backbones, instructblip_checkpoint, tmp_path, capsys):
    from mmadapters.cli import main

    path, _ = instructblip_checkpoint
    assert main(["convert-instructblip", path, str(tmp_path / "crome"), "--llm", backbones["llama"]]) == 0
    assert "qformer, query_tokens, query_projection" in capsys.readouterr().out
    model = CromeForConditionalGeneration.from_pretrained(tmp_path / "crome")
    assert model.config.qformer_source["name_or_path"] == path
    assert os.path.isdir(tmp_path / "crome" / "qformer_tokenizer") or os.path.isfile(
        tmp_path / "crome" / "processor_config.json"
    )


def saved_model_that_answers_in_words(backbones, kind, folder):
    """A CROME around the `kind` LLM whose greedy answers are words (a tiny random T5 answers <pad>: the special
    tokens are suppressed, in the LLM's generation config and the model's), saved with its processor."""
    if kind == "t5":
        from transformers import GenerationConfig

        t5 = folder.parent / f"{folder.name}-t5"
        shutil.copytree(backbones["t5"], t5)
        config = GenerationConfig.from_pretrained(t5)
        config.suppress_tokens = [config.pad_token_id, config.eos_token_id]
        config.save_pretrained(t5)
        backbones = {**backbones, "t5": str(t5)}
    model, processor = build(backbones, kind)
    model.generation_config.suppress_tokens = [
        processor.tokenizer.pad_token_id,
        processor.tokenizer.eos_token_id,
    ]
    model.eval().save_pretrained(folder, processor=processor)
    return model, processor


def whole_answer(model, processor, messages, images=None, max_new_tokens=4):
    from mmadapters.evaluation.generate import answer_tokens

    inputs = processor(
        images=images, text=processor.apply_chat_template(messages, add_generation_prompt=True)
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    answer = processor.decode(answer_tokens(model, inputs["input_ids"], output)[0], skip_special_tokens=True)
    assert answer.strip(), "the tiny model's answer is empty: the test would prove nothing"
    return answer


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_chat_command_prints_the_whole_answer_for_both_llm_kinds(
    backbones, tmp_path, monkeypatch, capsys, kind
):
    # An encoder-decoder LLM's generate returns the answer only: chat must not cut it at the prompt length.
    import io
    import sys

    from mmadapters.cli import main

    model, processor = saved_model_that_answers_in_words(backbones, kind, tmp_path / "crome")
    question = "the capital of france is"
    messages = [{"role": "user", "content": [{"type": "text", "text": question}]}]
    expected = whole_answer(model, processor, messages)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{question}\n/quit\n"))
    assert main(["chat", str(tmp_path / "crome"), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == expected.strip()


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_the_model_card_snippet_prints_the_whole_answer_for_both_llm_kinds(backbones, tmp_path, capsys, kind):
    """The card's usage snippet, run as written (the repo id replaced by the folder), prints what the model
    answers; for a T5 CROME it printed nothing (it cut generate's output at the prompt length)."""
    import re

    from PIL import Image

    from mmadapters.hub import build_model_card

    folder = tmp_path / "crome"
    model, processor = saved_model_that_answers_in_words(backbones, kind, folder)
    card = str(build_model_card(str(folder), str(folder), license="apache-2.0"))
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    exec(compile(snippet, "model card snippet", "exec"), {})
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is this?"}]}
    ]
    expected = whole_answer(
        model, processor, messages, [Image.new("RGB", (224, 224), "white")], max_new_tokens=32
    )
    assert capsys.readouterr().out == expected + "\n"


def test_seq2seq_trainer_scores_a_t5_crome_by_its_generated_answers(backbones, tmp_path):
    """transformers' Seq2SeqTrainer(predict_with_generate=True), the usual way to score an encoder-decoder by its
    answers, pads the generated ids with the processing class's `pad_token_id`: transformers' processors have
    none, and it stopped with "Pad_token_id must be set". Ours give the id they pad with. The predictions are
    what `generate` returns for the same batch, with the plain Seq2SeqTrainer and mixed with CromeTrainer."""
    from conftest import toy_dataset
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    from mmadapters.trainers import CromeTrainer, VisionLanguageCollator

    class CromeSeq2SeqTrainer(CromeTrainer, Seq2SeqTrainer):
        pass

    model, processor = build(backbones, "t5")
    randomize_up(model, std=0.5)
    assert processor.pad_token_id == processor.tokenizer.pad_token_id is not None
    assert processor.eos_token_id == processor.tokenizer.eos_token_id
    (tmp_path / "images").mkdir()
    dataset = toy_dataset(tmp_path / "images", n=4)
    collator = VisionLanguageCollator(processor)
    batch = collator([dataset[i] for i in range(4)])
    batch.pop("labels")
    generate = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    with torch.no_grad():
        expected = model.generate(**batch, **generate)
    args = Seq2SeqTrainingArguments(
        str(tmp_path / "out"),
        per_device_eval_batch_size=4,
        use_cpu=True,
        report_to=[],
        predict_with_generate=True,
        remove_unused_columns=False,  # transformers' own Trainer would drop the raw columns our collator reads
    )
    for trainer_class in (Seq2SeqTrainer, CromeSeq2SeqTrainer):
        trainer = trainer_class(model=model, args=args, data_collator=collator, processing_class=processor)
        predictions = trainer.predict(dataset, **generate).predictions
        assert predictions[:, : expected.shape[1]].tolist() == expected.tolist(), trainer_class.__name__
        assert (predictions[:, expected.shape[1] :] == processor.pad_token_id).all()


@pytest.mark.parametrize("kind", ["lavin", "llama"])
def test_flex_attention_is_taken_as_transformers_models_take_it(
    backbones, kind, randomize_adapters, tmp_path
):
    """`set_attn_implementation("flex_attention")` and a full checkpoint loaded with it were refused with
    transformers' "does not support ... request the support for this architecture" although every backbone here
    supports it (an adapter-only load took it). The same model with flex attention computes what it computes with
    sdpa (on the tokens that are not padding; inference only on CPU, where flex attention has no backward). A T5
    LLM is not tested: transformers' T5 with flex attention and an attention mask stops inside torch's compiled
    kernel on CPU by itself (transformers 5.24, torch 2.13)."""
    model, processor = build_with_active_adapters(backbones, kind, randomize_adapters)
    text = "<image>\nwhat color is it?" if kind != "lavin" else "Image: <image>\nwhat color is it?"
    inputs = processor(images=[[image(0)], []], text=[text, "the capital of"])
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        expected = model(**inputs).logits[real]
    model.save_pretrained(tmp_path / "full", adapter_only=False)
    model.set_attn_implementation("flex_attention")
    loaded = type(model).from_pretrained(tmp_path / "full", attn_implementation="flex_attention").eval()
    for flex in (model, loaded):
        assert flex.language_model.config._attn_implementation == "flex_attention"
        assert flex.vision_tower.config._attn_implementation == "flex_attention"
        with torch.no_grad():
            torch.testing.assert_close(flex(**inputs).logits[real], expected, atol=1e-4, rtol=1e-4)


def test_a_processor_for_the_other_kind_of_llm_is_refused_when_saving(backbones, tmp_path):
    """A T5 CROME saved with a processor built on a decoder-only LLM (same tokenizer, same visual tokens) lays
    answers out as a decoder-only LLM takes them: refused before anything is written (it was saved)."""
    model, _ = build(backbones, "t5")
    decoder_only = CromeProcessor.from_backbones(
        backbones["llama"], backbones["vision"], num_image_tokens=model.config.num_image_tokens
    )
    with pytest.raises(ValueError, match="for a decoder-only LLM, but this model's is encoder-decoder"):
        model.save_pretrained(tmp_path / "out", processor=decoder_only)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def instructblip_with_its_own_qformer_tokenizer(tmp_path_factory):
    return save_tiny_instructblip(tmp_path_factory.mktemp("instructblip-own-tokenizer"))


def test_a_crome_from_instructblip_rebuilds_its_qformer_tokenizer(
    backbones, instructblip_with_its_own_qformer_tokenizer, tmp_path
):
    """A CROME converted from InstructBLIP and saved without its processor: the rebuilt processor tokenized the
    Q-Former's instruction with the LLM's tokenizer (the Q-Former read ids of another vocabulary); it now takes
    InstructBLIP's Q-Former tokenizer, as the converter's processor does. A processor whose Q-Former tokenizer
    does not fit the Q-Former's vocabulary is refused when saving."""
    path = instructblip_with_its_own_qformer_tokenizer
    model, processor = from_instructblip(path, text_model=backbones["llama"])
    model.save_pretrained(tmp_path / "ckpt")
    rebuilt = CromeProcessor.from_pretrained(tmp_path / "ckpt")
    text = "<image>\nwhat color is the shape?"
    expected, got = processor(images=[image(0)], text=text), rebuilt(images=[image(0)], text=text)
    assert all(torch.equal(got[key], expected[key]) for key in expected)
    llm_tokenized = CromeProcessor.from_backbones(
        backbones["llama"], path, num_image_tokens=model.config.num_image_tokens
    )
    with pytest.raises(
        ValueError, match=r"Q-Former tokenizer has \d+ tokens, more than the Q-Former's vocabulary"
    ):
        model.save_pretrained(tmp_path / "out", processor=llm_tokenized)


def test_an_instructblip_checkpoint_given_as_the_qformer_tokenizer_gives_its_qformer_tokenizer(
    backbones, instructblip_with_its_own_qformer_tokenizer
):
    """`qformer_tokenizer=` naming an InstructBLIP checkpoint took the tokenizer at its root (its LLM's), not the
    Q-Former's in its `qformer_tokenizer/` folder."""
    path = instructblip_with_its_own_qformer_tokenizer
    processor = CromeProcessor.from_backbones(backbones["llama"], path, qformer_tokenizer=path)
    assert processor.qformer_tokenizer.get_vocab() == word_level_tokenizer().get_vocab()


def test_a_tower_that_gives_its_sizes_as_pairs_builds_crome_and_its_processor(tmp_path):
    """InternVL's vision tower gives `image_size` and `patch_size` as (height, width) pairs: CROME stopped
    computing its patch count ("unsupported operand type(s) for //: 'tuple' and 'tuple'"). Square pairs count as
    one side; the processor resizes to it and the model takes its inputs. Pairs of unequal sides are refused."""
    from conftest import save_tiny_llm, tiny_sample_inputs
    from transformers import InternVLVisionConfig, InternVLVisionModel

    def tiny_internvl_tower(image_size):
        return InternVLVisionConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=image_size,
            patch_size=(8, 8),
        )

    InternVLVisionModel(tiny_internvl_tower((32, 32))).save_pretrained(tmp_path / "tower")
    llm = save_tiny_llm(tmp_path / "llm")
    model = CromeForConditionalGeneration.from_backbones(
        llm, str(tmp_path / "tower"), num_query_tokens=4
    ).eval()
    assert model.config.num_image_tokens == 4 + 16
    processor = CromeProcessor.from_model(model)
    inputs = tiny_sample_inputs(processor)
    assert inputs["pixel_values"].shape[-2:] == (32, 32)
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()
    oblong = tiny_internvl_tower((32, 64))
    with pytest.raises(ValueError, match=r"image_size is \(32, 64\): LaVIN and CROME feed it square images"):
        CromeForConditionalGeneration.from_backbones(llm, oblong, num_query_tokens=4)
