"""LaVIN's official prompt layout and tokenisation (`official_tokenization=True`), checked with a tiny
SentencePiece LLaMA-style tokenizer trained here (the official LLaMA tokenizer is not available offline), for the
legacy and non-legacy LLaMA tokenizers, image and text-only samples, prompts and training targets."""

from __future__ import annotations

import io

import pytest

sentencepiece = pytest.importorskip("sentencepiece")

from transformers import LlamaTokenizer  # noqa: E402

from mmadapters import LavinProcessor  # noqa: E402
from mmadapters.data import scienceqa_example  # noqa: E402
from mmadapters.processing.base import IMAGENET_MEAN, IMAGENET_STD, resize_only_image_processor  # noqa: E402

CORPUS = [
    "Question: Which of these states is farthest north?",
    "Context: N/A",
    "Options: (A) West Virginia (B) Louisiana",
    "Response: The answer is A. BECAUSE: Maps have four cardinal directions.",
    "Image: N/A",
    "Instruction: describe the image",
    "what color is it? the capital of france is paris",
    "The answer is B.",
]
IMG = "<image>"


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A LLaMA-style SentencePiece model: BPE, byte fallback, word-start prefix, whitespace kept (one thread:
    the same model every run)."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 50),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
    )
    folder = tmp_path_factory.mktemp("sp-llama")
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return folder


def official_encode(sp, text):
    """The official `Tokenizer.encode(text, bos=False, eos=False)`: SentencePiece on the piece alone."""
    return sp.encode(text)


@pytest.fixture(params=[True, False], ids=["legacy", "non-legacy"])
def processor(request, sp_model):
    tokenizer = LlamaTokenizer.from_pretrained(sp_model, legacy=request.param)
    image_processor = resize_only_image_processor(32, IMAGENET_MEAN, IMAGENET_STD)
    return LavinProcessor(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=2, official_tokenization=True
    )


def pieces(processor, ids):
    return [
        IMG if i == processor.image_token_id else processor.tokenizer.convert_ids_to_tokens(i) for i in ids
    ]


def test_image_prompt_pieces_are_the_official_ones(processor, sp_model):
    import numpy as np

    image = np.zeros((32, 32, 3), dtype=np.uint8)
    ids = processor(images=[[image]], text=["Image: <image> Question: Which"])["input_ids"][0].tolist()
    # Hand-written: BOS, "Image: " with its trailing word-start piece, the visual tokens, then "▁Question" (a
    # joint encode of "Image: <image>\nQuestion" gives a newline byte and "Qu" without the word-start marker).
    assert pieces(processor, ids) == [
        "<s>", "▁I", "mage", ":", "▁", IMG, IMG, "▁Qu", "es", "tio", "n", ":", "▁W", "hi", "ch",
    ]  # fmt: skip
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_model / "tokenizer.model"))
    reference = [1] + official_encode(sp, "Image: ") + [processor.image_token_id] * 2
    assert ids == reference + official_encode(sp, "Question: Which")


def test_text_only_prompt_and_training_target_are_the_official_ones(processor, sp_model):
    prompt, answer = "Question: Which\nResponse:", "The answer is A."
    batch = processor(text=["Image: N/A " + prompt], answers=[answer])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    got = pieces(processor, ids)
    # "Image: N/A" then the prompt on its own; the answer joined to "Response:" with no space ("Response:The";
    # "R" has no word-start marker: it follows a newline).
    assert got[:6] == ["<s>", "▁I", "mage", ":", "▁N", "/"] and got[6:8] == ["A", "▁Qu"]
    assert got[got.index(":", 12) - 4 : got.index(":", 12) + 3] == [
        "R",
        "es",
        "po",
        "nse",
        ":",
        "The",
        "▁answer",
    ]
    assert got[-1] == "</s>"
    # The official tokenize(): encode(prompt) for the mask, encode(prompt + answer) for the ids, both with BOS.
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_model / "tokenizer.model"))
    head = official_encode(sp, "Image: N/A")
    prompt_ids = [1] + head + official_encode(sp, prompt)
    example = [1] + head + official_encode(sp, prompt + answer) + [2]
    assert ids == example
    assert labels == [-100] * len(prompt_ids) + example[len(prompt_ids) :]


def test_sample_lengths_are_the_built_samples_lengths_without_the_images(processor):
    """What the Trainers group by under `group_by_length`: BOS, the head encoded piece by piece and prompt + answer
    encoded together make these samples longer than their text's joint token count."""
    import numpy as np

    texts = [
        "Image: <image> Question: Which\nResponse:",
        "Image: N/A Question: Which is farthest north?\nResponse:",
    ]
    answers = ["The answer is A.", "The answer is B. BECAUSE: Maps have four cardinal directions."]
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    built = processor(images=[[image], []], text=texts, answers=answers)["attention_mask"].sum(-1).tolist()
    assert processor.sample_lengths(texts, answers) == built
    prompts_only = processor(images=[[image], []], text=texts)["attention_mask"].sum(-1).tolist()
    assert processor.sample_lengths(texts) == prompts_only
    assert processor.sample_lengths(texts, answers, max_length=12, overflow="truncate_right") == [12, 12]


def test_scienceqa_prompts_use_the_official_head(processor, sp_model):
    row = {
        "question": "Which?",
        "hint": "",
        "choices": ["a", "b"],
        "answer": 1,
        "lecture": "",
        "solution": "",
        "image": None,
    }
    example = scienceqa_example(row)
    assert example["prompt"].startswith("Image: N/A Question: Which?")
    ids = processor(text=[example["prompt"]])["input_ids"][0].tolist()
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_model / "tokenizer.model"))
    assert ids == [1] + official_encode(sp, "Image: N/A") + official_encode(
        sp, example["prompt"][len("Image: N/A ") :]
    )


def test_official_instruction_chat_template(processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "Image: <image> Instruction: describe the image\nResponse: "
    text_only = processor.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text_only == "Image: N/A Instruction: hi\nResponse: "


def test_prompts_outside_the_official_layout_are_refused(processor):
    with pytest.raises(ValueError, match="official layout"):
        processor(text=["Question: hi"])
    with pytest.raises(ValueError, match="official layout"):
        processor(text=["Image: N/A\nQuestion: hi"])


def test_sanitized_text_is_refused_with_the_official_tokenization(processor):
    """`sanitize_control_tokens` (set by transformers' apply_chat_template) with LaVIN's official piecewise encoding
    of its fixed layout is refused by name (it takes no marked text), as transformers releases without it are."""
    with pytest.raises((ValueError, TypeError), match="sanitize_control_tokens"):
        processor(text="Image: N/A Instruction: hi\nResponse: ", sanitize_control_tokens=True)
