"""LavinProcessor: layout, chat template, labels, padding, and every documented bad input (foundation item 4)."""

from __future__ import annotations

import io
import re

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.utils import PaddingStrategy

from mmadapters import (
    CromeProcessor,
    ImageTokenMismatchError,
    InvalidImageError,
    InvalidTextError,
    LavinProcessor,
    PromptTooLongError,
)
from mmadapters.processing import load_image
from mmadapters.processing.base import (
    CONTROL_MARK_END,
    CONTROL_MARK_START,
    special_tokens_around,
    takes_sanitized_text,
)


@pytest.fixture()
def processor(tiny_backbones):
    return LavinProcessor.from_backbones(*tiny_backbones)


def rgb(size=(40, 30), color=(200, 10, 10)):
    return Image.new("RGB", size, color)


def test_placeholder_expansion_and_pixel_values(processor):
    out = processor(images=[rgb()], text="Image: <image>\nwhat color?")
    ids = out["input_ids"][0].tolist()
    assert ids.count(processor.image_token_id) == processor.num_image_tokens == 2
    assert out["pixel_values"].shape == (1, 3, 32, 32)
    # The image tokens directly follow "Image: ".
    prefix = processor.tokenizer("Image: ", add_special_tokens=False)["input_ids"]
    assert ids[: len(prefix)] == prefix and ids[len(prefix)] == processor.image_token_id


def test_chat_template_image_and_text_only(processor):
    image_chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color?"}]}]
    text_chat = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    assert processor.apply_chat_template(image_chat, add_generation_prompt=True) == (
        "<|user|>Image: <image>\nwhat color?</s><|assistant|>"
    )
    assert processor.apply_chat_template(text_chat, add_generation_prompt=True) == (
        "<|user|>Image: N/A\nhello</s><|assistant|>"
    )
    multi_turn = [
        *image_chat,
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "and the shape?"}]},
    ]
    assert processor.apply_chat_template(multi_turn, add_generation_prompt=True) == (
        "<|user|>Image: <image>\nwhat color?</s><|assistant|>red</s><|user|>and the shape?</s><|assistant|>"
    )


@pytest.mark.parametrize("processor_class", [LavinProcessor, CromeProcessor])
def test_named_chat_templates_of_the_llm_are_kept(tiny_backbones, processor_class, tmp_path):
    """An LLM whose tokenizer has several named chat templates (Command-R's and Hermes' "default", "tool_use",
    "rag") keeps them all behind our message flattening: `apply_chat_template(chat, chat_template="tool_use")` picks
    one by name, as transformers' processors do, and a save keeps them. Before, only "default" was kept, and the
    name "tool_use" was rendered as if it were a template: the prompt was the text "tool_use"."""
    llm, vision = tiny_backbones
    built = processor_class.from_backbones(llm, vision)
    tokenizer = built.tokenizer
    tokenizer.chat_template = {
        "default": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
        "tool_use": "TOOLS {{ tools | length }}|{% for m in messages %}{{ m['content'] }}|{% endfor %}",
    }
    kwargs = {"qformer_tokenizer": built.qformer_tokenizer} if processor_class is CromeProcessor else {}
    processor = processor_class(
        built.image_processor, tokenizer, num_image_tokens=built.num_image_tokens, **kwargs
    )
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color?"}]}]
    image_text = "Image: <image>\n" if processor_class is LavinProcessor else "<image>\n"
    tools = [
        {"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}
    ]
    assert processor.apply_chat_template(chat) == f"user: {image_text}what color?\n"
    assert processor.apply_chat_template(chat, chat_template="tool_use", tools=tools) == (
        f"TOOLS 1|{image_text}what color?|"
    )
    processor.save_pretrained(tmp_path / "saved")
    reloaded = processor_class.from_pretrained(tmp_path / "saved")
    assert reloaded.apply_chat_template(chat, chat_template="tool_use", tools=tools) == (
        f"TOOLS 1|{image_text}what color?|"
    )


@pytest.mark.parametrize("processor_class", [LavinProcessor, CromeProcessor])
def test_sanitize_control_tokens_keeps_the_users_control_tokens_as_text(tiny_backbones, processor_class):
    """transformers' `apply_chat_template(..., sanitize_control_tokens=True)` marks the control tokens in the user's
    own text and asks the processor to encode them as text: a user's "<image>" is then no second image and a user's
    "</s>" no end of turn. Our processors refused the keyword (TypeError). Now the template's placeholder is the
    one image, the user's `<image>` and `</s>` are plain tokens, and the rest is encoded as without sanitizing. A
    transformers release whose processors do not mark (5.20) gets a clear refusal."""
    processor = processor_class.from_backbones(*tiny_backbones)
    image = {"type": "image", "image": rgb()}
    question = [{"role": "user", "content": [image, {"type": "text", "text": "what <image> is </s> here?"}]}]
    kwargs = dict(tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True)
    if not takes_sanitized_text():
        with pytest.raises(TypeError, match="sanitize_control_tokens needs a transformers release"):
            processor.apply_chat_template(question, sanitize_control_tokens=True, **kwargs)
        return
    from transformers.utils import chat_template_utils

    assert (CONTROL_MARK_START, CONTROL_MARK_END) == (
        chat_template_utils._CONTROL_TOKEN_START,
        chat_template_utils._CONTROL_TOKEN_END,
    )
    with pytest.raises(ImageTokenMismatchError):  # unsanitized, the user's "<image>" asks for a second image
        processor.apply_chat_template(question, **kwargs)
    out = processor.apply_chat_template(question, sanitize_control_tokens=True, **kwargs)
    ids = out["input_ids"][0]
    tokenizer = processor.tokenizer
    image_tokens = ids == processor.image_token_id
    assert int(image_tokens.sum()) == processor.num_image_tokens  # the template's placeholder only
    # the user's "<image>" and "</s>" are plain tokens: the text reads as written, with one "</s>" fewer as a token
    plain = processor.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token if ids[0] == tokenizer.bos_token_id else ""
    assert tokenizer.decode(ids[~image_tokens]) == bos + plain.replace("<image>", "", 1)
    assert int((ids == tokenizer.eos_token_id).sum()) == plain.count("</s>") - 1
    if processor_class is CromeProcessor:  # the Q-Former reads the user's text as written
        instruction = processor.qformer_tokenizer.decode(
            out["qformer_input_ids"][0], skip_special_tokens=False
        )
        assert CONTROL_MARK_START not in instruction and "what" in instruction
        assert out["prompt_mask"][0].tolist() == (ids != processor.image_token_id).long().tolist()


@pytest.mark.parametrize("template", ["<s> $A", "$A </s>", "<s> $A </s>", "$A"])
def test_special_tokens_around_a_text_are_found_on_either_side(template):
    """What a sanitized prompt gets around it (transformers' tokenizer adds no special tokens to marked text):
    the tokenizer's own BOS before (Llama) and EOS after (T5)."""
    from conftest import make_tokenizer
    from tokenizers import processors

    tokenizer = make_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in ("<s>", "</s>")}
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=list(ids.items())
    )
    before, after = special_tokens_around(tokenizer)
    assert before == ([ids["<s>"]] if template.startswith("<s>") else [])
    assert after == ([ids["</s>"]] if template.endswith("</s>") else [])


def test_apply_chat_template_tokenized_with_image(processor, tmp_path):
    path = tmp_path / "red.png"
    rgb().save(path)
    chat = [
        {"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": "what?"}]}
    ]
    out = processor.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert out["pixel_values"].shape[0] == 1
    assert (out["input_ids"] == processor.image_token_id).sum() == processor.num_image_tokens


@pytest.mark.parametrize("processor_class", [LavinProcessor, CromeProcessor])
def test_tokenized_chat_template_without_return_tensors_gives_unpadded_rows(tiny_backbones, processor_class):
    """As transformers' processors: plain lists, one unpadded row per conversation. TRL's GRPO reads each row as a
    whole prompt: our padded batch put a shorter prompt's padding inside it (23 pad tokens in this one)."""
    options = {"num_image_tokens": 4} if processor_class is CromeProcessor else {}
    processor = processor_class.from_backbones(*tiny_backbones, **options)
    short = [
        {"role": "user", "content": [{"type": "image", "image": rgb()}, {"type": "text", "text": "color?"}]}
    ]
    long = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": rgb()},
                {"type": "text", "text": "what is the color of the shape in this image please?"},
            ],
        }
    ]
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True)
    rows = processor.apply_chat_template([short, long], **kwargs)
    batch = processor.apply_chat_template([short, long], **kwargs, return_tensors="pt")
    assert set(rows) == set(batch)
    for name, value in batch.items():
        if name == "pixel_values":
            np.testing.assert_array_equal(np.stack(rows[name]), value.numpy())
            continue
        mask = batch["qformer_attention_mask" if name.startswith("qformer_") else "attention_mask"].bool()
        assert rows[name] == [row[keep].tolist() for row, keep in zip(value, mask, strict=True)], name
    assert len(rows["input_ids"][0]) < len(rows["input_ids"][1])
    assert processor.tokenizer.pad_token_id not in rows["input_ids"][0]
    ids = processor.apply_chat_template(short, add_generation_prompt=True, tokenize=True)  # return_dict=False
    assert ids == rows["input_ids"][:1]
    fixed = processor.apply_chat_template([short, long], **kwargs, padding="max_length", max_length=64)
    assert [len(row) for row in fixed["input_ids"]] == [64, 64]
    in_dict = {"padding": "max_length", "max_length": 64}
    from_dict = processor.apply_chat_template([short, long], **kwargs, processor_kwargs=in_dict)
    assert (
        from_dict["input_ids"] == fixed["input_ids"]
        and from_dict["attention_mask"] == fixed["attention_mask"]
    )
    assert [sum(mask) for mask in fixed["attention_mask"]] == [len(row) for row in rows["input_ids"]]


def test_mixed_batch_left_padding(processor):
    out = processor(images=[[rgb()], []], text=["Image: <image>\nwhat color is it?", "Image: N/A\nhi"])
    assert out["pixel_values"].shape[0] == 1
    mask = out["attention_mask"]
    assert mask[0].all() and not mask[1, 0] and mask[1, -1]  # left padding on the shorter sample
    assert out["input_ids"][1, 0] == processor.tokenizer.pad_token_id


def test_labels_supervise_only_the_answer(processor):
    out = processor(
        images=[[rgb()], []],
        text=["Image: <image>\nwhat color is the shape?", "Image: N/A\nhi"],
        answers=["red", "hi"],
    )
    tok = processor.tokenizer
    for row, answer in enumerate(["red", "hi"]):
        labels = out["labels"][row]
        supervised = labels[labels != -100].tolist()
        assert supervised == tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        # Supervised positions hold the same ids as the input; image tokens and padding are never supervised.
        ids = out["input_ids"][row]
        assert torch.equal(ids[labels != -100], labels[labels != -100])
        assert not ((ids == processor.image_token_id) & (labels != -100)).any()
    assert out["attention_mask"][1, -1] == 0  # training batches are right-padded


def test_image_count_mismatch(processor):
    with pytest.raises(ImageTokenMismatchError, match="Got 2 image\\(s\\) but the text holds 1"):
        processor(images=[rgb(), rgb()], text="Image: <image>\nwhat?")
    with pytest.raises(ImageTokenMismatchError, match="Got 0 image\\(s\\)"):
        processor(text="Image: <image>\nwhat?")
    with pytest.raises(ImageTokenMismatchError, match="per sample"):
        processor(images=[[], [rgb()]], text=["Image: <image>\na", "Image: N/A\nb"])


def test_empty_prompt(processor):
    with pytest.raises(ValueError, match="Prompt 1 is empty"):
        processor(text=["hello", "   "])
    with pytest.raises(ValueError, match="text is an empty list"):  # before: "max() arg is an empty sequence"
        processor(text=[])


@pytest.mark.parametrize(
    "call, message",
    [
        # Before: "'int' object is not iterable" and, for a list holding a non-string, "Prompt 1 is empty".
        (dict(text=123), "text must be a string or a list of strings, got int"),
        (dict(text=["hello", None]), "Prompt 1 is of type NoneType, not a string"),
        (dict(text=["hello", b"bytes"]), "Prompt 1 is of type bytes, not a string"),
        (dict(text="hello", answers=7), "answers must be a string or a list of strings, got int"),
        (dict(text=["a", "b"], answers=["x", 7]), "Answer 1 is of type int, not a string"),
    ],
)
def test_text_and_answers_of_another_type_are_named(processor, call, message):
    with pytest.raises(InvalidTextError, match=message):  # a TypeError, and one of ours: the CLI reports it
        processor(**call)


def test_text_and_answers_may_be_a_data_set_column(processor):
    rows = datasets.Dataset.from_dict(
        {"prompt": ["Image: N/A\nhello", "Image: N/A\nbye"], "target": ["a", "b"]}
    )
    from_column = processor(text=rows["prompt"], answers=rows["target"])
    from_list = processor(text=list(rows["prompt"]), answers=list(rows["target"]))
    assert torch.equal(from_column["input_ids"], from_list["input_ids"])
    assert torch.equal(from_column["labels"], from_list["labels"])


def test_over_long_prompt_raise_and_truncate(processor):
    long_text = "Image: <image>\n" + "the shape is red. " * 40
    with pytest.raises(PromptTooLongError, match="more than max_length=50"):
        processor(images=[rgb()], text=long_text, max_length=50)
    out = processor(images=[rgb()], text=long_text, max_length=50, overflow="truncate_right")
    assert out["input_ids"].shape[1] == 50
    assert (out["input_ids"] == processor.image_token_id).sum() == 2
    # Left truncation would cut the image at the start: refused, not silently broken.
    with pytest.raises(PromptTooLongError, match="cut image tokens"):
        processor(images=[rgb()], text=long_text, max_length=50, overflow="truncate_left")
    text_only = processor(text="Image: N/A\n" + "one two " * 40, max_length=20, overflow="truncate_left")
    assert text_only["input_ids"].shape[1] == 20


def test_call_keywords_honoured_or_refused(processor):
    """transformers' processor keywords that match what the processor does are accepted; every other keyword is
    refused with the list of what it takes (a pipeline hands its unknown keywords here: generation options get a
    pointer to generate_kwargs)."""
    text = ["Image: N/A\nhello", "Image: N/A\na longer prompt here"]
    plain = processor(text=text)
    for accepted in (
        {"padding": True},
        {"padding": "longest"},
        {"return_attention_mask": True},
        {"videos": None},
    ):
        torch.testing.assert_close(processor(text=text, **accepted)["input_ids"], plain["input_ids"])
    plain_values = processor(images=[rgb()], text="Image: <image>\nwhat?", return_tensors=None)
    assert isinstance(plain_values["input_ids"], list) and isinstance(plain_values["pixel_values"], list)
    np.testing.assert_array_equal(
        np.stack(plain_values["pixel_values"]),
        processor(images=[rgb()], text="Image: <image>\nwhat?")["pixel_values"].numpy(),
    )
    with pytest.raises(ValueError, match="padding='middle' is not supported"):
        processor(text=text, padding="middle")
    with pytest.raises(ValueError, match="always returns attention_mask"):
        processor(text=text, return_attention_mask=False)
    chat = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    with pytest.raises(TypeError, match=r"return_assistant_tokens_mask=True\) is not supported.*answers="):
        processor.apply_chat_template(
            chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
    with pytest.raises(ValueError, match="takes images and text; got videos"):
        processor(text=text, videos=[np.zeros((2, 8, 8, 3), dtype=np.uint8)])
    with pytest.raises(TypeError, match=r"\['stride'\].*overflow='truncate_left'"):
        processor(text=text, stride=2)
    with pytest.raises(TypeError, match=r"\['do_sample'\].*generate_kwargs"):
        processor(text=text, do_sample=False)
    with pytest.raises(ValueError, match="overflow must be one of"):
        processor(text=text, overflow="cut")
    with pytest.raises(TypeError, match=r"\['max_lenght'\] \(did you mean 'max_length' for 'max_lenght'\?\)"):
        processor(text=text, max_lenght=8)


@pytest.mark.parametrize("processor_class", [LavinProcessor, CromeProcessor])
def test_padding_side_pad_to_multiple_of_and_truncation_are_honoured(tiny_backbones, processor_class):
    """transformers' tokenizer keywords that processors take (TRL's collators pass them, for instance):
    `padding_side` and `pad_to_multiple_of` as the tokenizer honours them; `truncation=True` cuts at `max_length`
    on the tokenizer's truncation side (never through an image), `truncation=False` never cuts. They used to be
    refused."""
    processor = processor_class.from_backbones(*tiny_backbones)
    text = ["Image: <image>\nwhat color?", "Image: N/A\na much longer prompt than the first one"]
    images = [[rgb()], []]
    for answers, default_side in ((None, "left"), (["red", "a long answer here"], "right")):
        plain = processor(images=images, text=text, answers=answers)
        lengths = plain["attention_mask"].sum(dim=1)
        row, shorter = int(lengths.argmin()), int(lengths.min())
        assert shorter < int(lengths.max())
        for side in ("left", "right"):
            out = processor(images=images, text=text, answers=answers, padding_side=side)
            mask = out["attention_mask"][row]
            padding, tokens = (
                (mask[:-shorter], mask[-shorter:]) if side == "left" else (mask[shorter:], mask[:shorter])
            )
            assert tokens.all() and not padding.any(), side
            # The same tokens, moved: each row's kept values are the plain ones.
            for name, values in out.items():
                if name in ("pixel_values", "qformer_input_ids", "qformer_attention_mask"):
                    torch.testing.assert_close(values, plain[name])
                    continue
                # Encoder-decoder labels are the decoder's targets, right-padded on their own.
                if values.shape != plain[name].shape:
                    continue
                keep, plain_keep = out["attention_mask"].bool(), plain["attention_mask"].bool()
                assert torch.equal(values[keep], plain[name][plain_keep]), (side, name)
            if side == default_side:
                assert torch.equal(out["input_ids"], plain["input_ids"])
        padded = processor(images=images, text=text, answers=answers, pad_to_multiple_of=16)
        longest = plain["input_ids"].shape[1]
        assert padded["input_ids"].shape[1] == -(-longest // 16) * 16 > longest
        assert padded["attention_mask"].sum() == plain["attention_mask"].sum()
    long_text = "Image: N/A\n" + "one two " * 40
    processor.tokenizer.truncation_side = "left"
    kept = processor(text=long_text, max_length=20, truncation=True)["input_ids"][0]
    torch.testing.assert_close(
        kept, processor(text=long_text, max_length=20, overflow="truncate_left")["input_ids"][0]
    )
    processor.tokenizer.truncation_side = "right"
    kept = processor(text=long_text, max_length=20, truncation="longest_first")["input_ids"][0]
    torch.testing.assert_close(
        kept, processor(text=long_text, max_length=20, overflow="truncate_right")["input_ids"][0]
    )
    with pytest.raises(PromptTooLongError, match="more than max_length=20"):
        processor(text=long_text, max_length=20, truncation=False)
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        processor(text=text[1], padding_side="middle")
    with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive integer"):
        processor(text=text[1], pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="truncation=True and overflow='raise' disagree"):
        processor(text=text[1], truncation=True, overflow="raise")
    with pytest.raises(ValueError, match="only_second"):
        processor(text=text[1], truncation="only_second")


@pytest.mark.parametrize("processor_class", [LavinProcessor, CromeProcessor])
@pytest.mark.parametrize("answers", [None, ["red", "a long answer here"]])
def test_padding_max_length_and_no_padding_are_honoured(tiny_backbones, processor_class, answers):
    """transformers' `padding="max_length"` (static shapes: every sample padded to max_length) and `padding=False`
    (rows as they are) work as a tokenizer's do: the same tokens as the default padding, placed differently. They
    used to be refused."""
    processor = processor_class.from_backbones(*tiny_backbones)
    text = ["Image: <image>\nwhat color?", "Image: N/A\na much longer prompt than the first one"]
    images = [[rgb()], []]
    plain = processor(images=images, text=text, answers=answers)
    longest = plain["input_ids"].shape[1]
    fixed = processor(images=images, text=text, answers=answers, padding="max_length", max_length=longest + 7)
    assert fixed["input_ids"].shape == (2, longest + 7)
    if processor_class is CromeProcessor:  # the Q-Former's instructions: to their own limit
        assert fixed["qformer_input_ids"].shape == (1, processor.qformer_max_length)
        assert fixed["qformer_attention_mask"].sum() == plain["qformer_attention_mask"].sum()
        processor.qformer_max_length = plain["qformer_input_ids"].shape[1]  # the rest compares the two
        fixed = processor(
            images=images, text=text, answers=answers, padding="max_length", max_length=longest + 7
        )
    side = "right" if answers else "left"
    for name, values in plain.items():
        if name == "pixel_values" or name.startswith("qformer_"):
            torch.testing.assert_close(fixed[name], values)
            continue
        keep = fixed["attention_mask"].bool()
        assert torch.equal(fixed[name][keep], values[plain["attention_mask"].bool()]), name
    padded_end = fixed["attention_mask"][:, -1 if side == "right" else 0]
    assert not padded_end.any()
    # As transformers' tokenizers: max_length rounded up to pad_to_multiple_of; the processor's own max_length.
    rounded = processor(
        images=images, text=text, padding="max_length", max_length=longest + 1, pad_to_multiple_of=8
    )
    assert rounded["input_ids"].shape[1] == -(-(longest + 1) // 8) * 8
    processor.max_length = longest + 3
    assert (
        processor(images=images, text=text, padding=PaddingStrategy.MAX_LENGTH)["input_ids"].shape[1]
        == longest + 3
    )
    processor.max_length = None
    processor.tokenizer.model_max_length = int(1e30)  # what a tokenizer without a limit says
    with pytest.raises(ValueError, match="padding='max_length' needs a length: pass max_length="):
        processor(images=images, text=text, padding="max_length")

    rows = processor(images=images, text=text, answers=answers, padding=False, return_tensors=None)
    assert rows["input_ids"] == [
        row[keep].tolist()
        for row, keep in zip(plain["input_ids"], plain["attention_mask"].bool(), strict=True)
    ]
    assert all(set(mask) == {1} for mask in rows["attention_mask"])
    if processor_class is CromeProcessor:
        assert rows["qformer_input_ids"] == [
            row[keep].tolist()
            for row, keep in zip(
                plain["qformer_input_ids"], plain["qformer_attention_mask"].bool(), strict=True
            )
        ]
    with pytest.raises(
        ValueError, match="padding=False left the batch's input_ids rows of different lengths"
    ):
        processor(images=images, text=text, padding="do_not_pad")
    single = processor(images=[rgb()], text=text[0], answers=answers and answers[0], padding=False)
    assert torch.equal(
        single["input_ids"],
        processor(images=[rgb()], text=text[0], answers=answers and answers[0])["input_ids"],
    )


def test_an_encoder_decoder_crome_pads_its_decoder_targets_as_asked(backbones_by_llm):
    """A T5 CROME's labels are the decoder's targets, a sequence of their own: padded to the longest answer, and
    left as they are with padding=False."""
    processor = CromeProcessor.from_backbones(backbones_by_llm["t5"], backbones_by_llm["vision"])
    text, answers = ["<image>\nwhat color?", "hello there"], ["red", "a much longer answer"]
    images = [[rgb()], []]
    padded = processor(images=images, text=text, answers=answers)
    rows = processor(images=images, text=text, answers=answers, padding=False, return_tensors=None)
    assert rows["labels"] == [[t for t in row if t != -100] for row in padded["labels"].tolist()]
    assert len(rows["labels"][0]) < len(rows["labels"][1]) == padded["labels"].shape[1]


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_truncated_and_unreadable_files(processor, tmp_path):
    data = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidImageError, match="corrupt or truncated"):
        processor(images=[str(truncated)], text="Image: <image>\nwhat?")
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not an image")
    with pytest.raises(InvalidImageError, match="not a readable image"):
        processor(images=[str(not_image)], text="Image: <image>\nwhat?")
    with pytest.raises(InvalidImageError, match="does not exist"):
        processor(images=[str(tmp_path / "missing.png")], text="Image: <image>\nwhat?")
    with pytest.raises(InvalidImageError, match="Unsupported"):
        processor(images=[12345], text="Image: <image>\nwhat?")


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "P", "I;16", "1", "F"])
def test_modes_are_converted_to_rgb(mode):
    image = rgb((20, 20), (200, 100, 50)).convert(mode)
    loaded = load_image(png_bytes(image, "TIFF" if mode in ("CMYK", "F") else "PNG"))
    assert loaded.mode == "RGB" and loaded.size == (20, 20)


def test_arrays_and_tensors_in_every_channel_layout_load_as_the_same_image(processor):
    """uint8 arrays and torch tensors, channels last or first (torch's layout), one channel with or without its
    axis, a 4-D batch; float data is refused with what to do, not passed to Pillow."""
    pixels = np.random.default_rng(0).integers(0, 255, (6, 5, 3), dtype=np.uint8)
    expected = np.asarray(load_image(Image.fromarray(pixels)))
    for layout in (pixels, np.moveaxis(pixels, -1, 0), torch.from_numpy(pixels).permute(2, 0, 1)):
        np.testing.assert_array_equal(np.asarray(load_image(layout)), expected)
    gray = pixels[..., 0]
    expected_gray = np.asarray(load_image(Image.fromarray(gray)))
    for layout in (gray[..., None], gray[None], torch.from_numpy(gray.copy())):
        np.testing.assert_array_equal(np.asarray(load_image(layout)), expected_gray)
    with pytest.raises(InvalidImageError, match=r"float32.*\* 255"):
        load_image(pixels.astype(np.float32) / 255)
    with pytest.raises(InvalidImageError, match=r"float32.*\* 255"):
        load_image(torch.from_numpy(pixels).float() / 255)
    with pytest.raises(InvalidImageError, match=r"shape \(6, 5, 7\).*channels"):
        load_image(np.zeros((6, 5, 7), dtype=np.uint8))
    # A `datasets` Image column read without decoding gives {"bytes", "path"} dicts.
    stored = png_bytes(Image.fromarray(pixels))
    np.testing.assert_array_equal(np.asarray(load_image({"bytes": stored, "path": None})), expected)
    batch = torch.from_numpy(np.stack([pixels, pixels[::-1].copy()])).permute(0, 3, 1, 2)  # (2, C, H, W)
    prompts = ["Image: <image>\nwhat?", "Image: <image>\nand this?"]
    torch.testing.assert_close(
        processor(images=batch, text=prompts)["pixel_values"],
        processor(images=[pixels, pixels[::-1].copy()], text=prompts)["pixel_values"],
    )


def test_image_urls_are_downloaded_and_checked_like_files(processor, tmp_path):
    """An http(s) URL loads as transformers' image processors load it; a failed download or a file that is not an
    image is a clear InvalidImageError."""
    import functools
    import http.server
    import threading

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 16, 3), dtype=np.uint8))
    picture.save(tmp_path / "picture.png")
    (tmp_path / "notes.png").write_text("not an image")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        prompt = "Image: <image>\nwhat?"
        torch.testing.assert_close(
            processor(images=[f"{base}/picture.png"], text=prompt)["pixel_values"],
            processor(images=[str(tmp_path / "picture.png")], text=prompt)["pixel_values"],
        )
        with pytest.raises(InvalidImageError, match="could not be downloaded.*404"):
            load_image(f"{base}/missing.png")
        with pytest.raises(InvalidImageError, match="not a readable image"):
            load_image(f"{base}/notes.png")
    finally:
        server.shutdown()


def test_base64_images_load_as_in_transformers_chat_content(processor, tmp_path):
    """transformers' chat content `{"type": "image", "base64": ...}` and data URLs (`data:image/png;base64,...`,
    what OpenAI-style clients send) reached our image loader as strings and were read as missing files. They load
    as transformers' `load_image` loads them; a string that is neither a file nor a base64 image says so."""
    import base64
    import io

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 16, 3), dtype=np.uint8))
    picture.save(tmp_path / "picture.png")
    encoded = base64.b64encode((tmp_path / "picture.png").read_bytes()).decode()
    expected = np.asarray(load_image(str(tmp_path / "picture.png")))
    for given in (encoded, f"data:image/png;base64,{encoded}", encoded[:40] + "\n" + encoded[40:]):
        assert np.array_equal(np.asarray(load_image(given)), expected)
    chat = [
        {"role": "user", "content": [{"type": "image", "base64": encoded}, {"type": "text", "text": "what?"}]}
    ]
    out = processor.apply_chat_template(chat, tokenize=True, return_dict=True, return_tensors="pt")
    by_path = processor(images=[str(tmp_path / "picture.png")], text="Image: <image>\nwhat?")
    torch.testing.assert_close(out["pixel_values"], by_path["pixel_values"])
    for missing in ("photo.jpg", "abcd", base64.b64encode(b"not an image at all").decode()):
        with pytest.raises(
            InvalidImageError, match="does not exist or is not a file, nor a base64-encoded image"
        ):
            load_image(missing)
    with pytest.raises(InvalidImageError, match="data URL .* base64"):
        load_image("data:image/png,rawbytes")
    with pytest.raises(InvalidImageError, match="base64 payload does not decode"):
        load_image(f"data:image/png;base64,{encoded[:40]}!!")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    truncated = base64.b64encode(buffer.getvalue()[:60]).decode()
    with pytest.raises(InvalidImageError, match="corrupt or truncated|not a readable image"):
        load_image(f"data:image/png;base64,{truncated}")


def test_transparency_is_composited_on_white():
    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(transparent).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.info["transparency"] = 0
    assert load_image(palette).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_keeps_its_scale():
    array = np.full((4, 4), 65535 // 2, dtype=np.uint16)
    sixteen_bit = Image.fromarray(array)
    assert sixteen_bit.mode == "I;16"
    loaded = load_image(sixteen_bit)
    assert abs(loaded.getpixel((0, 0))[0] - 127) <= 1


def test_decompression_bomb_and_absurd_sizes_are_refused(tiny_backbones, tmp_path):
    strict = LavinProcessor.from_backbones(*tiny_backbones, max_image_pixels=10_000)
    big = tmp_path / "big.png"
    Image.new("L", (200, 200)).save(big)
    with pytest.raises(InvalidImageError, match="more than the limit of 10,000"):
        strict(images=[str(big)], text="Image: <image>\nwhat?")
    # A real bomb: a small file that declares a huge image; refused from the header, never decoded.
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12_000, 12_000)).save(bomb)
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(InvalidImageError, match="decompression bomb|Refusing"):
        load_image(str(bomb))
    with pytest.raises(InvalidImageError, match="aspect ratio"):
        load_image(Image.new("RGB", (1000, 2)))


def test_processor_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = LavinProcessor.from_pretrained(tmp_path)
    assert loaded.num_image_tokens == processor.num_image_tokens
    assert loaded.image_token_id == processor.image_token_id
    a = processor(images=[rgb()], text="Image: <image>\nwhat color?")
    b = loaded(images=[rgb()], text="Image: <image>\nwhat color?")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("max_length", "50", "max_length must be a positive integer or None, got '50'"),
        ("max_length", 0, "max_length must be a positive integer or None, got 0"),
        ("num_image_tokens", "2", "num_image_tokens must be a positive integer, got '2'"),
        ("max_image_pixels", "big", "max_image_pixels must be a positive integer, got 'big'"),
        ("official_tokenization", "no", "official_tokenization must be True or False, got 'no'"),
        ("qformer_max_length", 0, "qformer_max_length must be a positive integer, got 0"),
        ("encoder_decoder", "yes", "encoder_decoder must be True or False, got 'yes'"),
    ],
)
def test_a_wrong_value_in_processor_config_json_is_named_when_it_loads(
    tiny_backbones, tmp_path, field, value, message
):
    """A hand-edited processor_config.json: a string where a number belongs failed at the first call with a torch
    or Python comparison error, and "official_tokenization": "no" was read as true."""
    import json

    processor_class = CromeProcessor if field in ("qformer_max_length", "encoder_decoder") else LavinProcessor
    processor_class.from_backbones(*tiny_backbones).save_pretrained(tmp_path)
    config_path = tmp_path / "processor_config.json"
    config = json.loads(config_path.read_text())
    config[field] = value
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(message)):
        processor_class.from_pretrained(tmp_path)


def test_a_wrong_max_length_in_a_call_is_named(processor):
    with pytest.raises(ValueError, match="max_length must be a positive integer or None, got '20'"):
        processor(text="Image: N/A\nhello", max_length="20")


def test_official_preprocessing(tiny_backbones):
    official = LavinProcessor.from_backbones(*tiny_backbones, official_preprocessing=True)
    out = official(images=[rgb((300, 100), (255, 255, 255))], text="Image: <image>\nwhat?")
    assert out["pixel_values"].shape == (1, 3, 32, 32)  # resized to the tower's resolution, not cropped
    white = (1.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    torch.testing.assert_close(
        out["pixel_values"][0, :, 0, 0], torch.tensor(white, dtype=torch.float32), atol=1e-3, rtol=0
    )


def test_a_tower_whose_image_processor_tiles_images_gets_one_resized_image(tiny_backbones, tmp_path):
    """SmolVLM / Idefics3 towers ship an image processor that splits each image into tiles (5-D pixel values):
    LaVIN feeds one fixed-size image per <image>, so the processor resizes to the tower's resolution with the
    shipped processor's statistics. Before: the processor returned the tiles and the model refused its own
    processor's output ("pixel_values must be (num_images, 3, height, width)")."""
    from conftest import tiny_vision_config
    from transformers import Idefics3ImageProcessorPil

    from mmadapters import LavinForConditionalGeneration
    from mmadapters.modeling.backbones import build_vision_backbone

    tower = tmp_path / "tower"
    build_vision_backbone(tiny_vision_config("idefics3")).save_pretrained(tower)
    Idefics3ImageProcessorPil(
        size={"longest_edge": 64},
        max_image_size={"longest_edge": 32},
        image_mean=[0.25] * 3,
        image_std=[0.5] * 3,
    ).save_pretrained(tower)
    processor = LavinProcessor.from_backbones(tiny_backbones[0], str(tower))
    white = processor(images=[rgb((70, 50), (255, 255, 255))], text="Image: <image>\nwhat?")
    assert white["pixel_values"].shape == (1, 3, 32, 32)
    torch.testing.assert_close(white["pixel_values"], torch.full((1, 3, 32, 32), 1.5))  # (1 - 0.25) / 0.5
    model = LavinForConditionalGeneration.from_backbones(tiny_backbones[0], str(tower))
    assert model(**white).logits.shape[:2] == white["input_ids"].shape


def test_crome_normalises_images_with_the_towers_own_statistics(tiny_backbones, tmp_path):
    """CROME resizes to the tower's resolution (its patch count fixes the placeholders) with the statistics of the
    image processor the tower ships: SigLIP's 0.5 / 0.5 here. Before: always CLIP's, so a SigLIP or DINOv2 tower
    saw images off the distribution it was trained on. A tower given as a config has no image processor: CLIP's."""
    from conftest import tiny_vision_config
    from transformers import SiglipImageProcessorPil

    from mmadapters.modeling.backbones import build_vision_backbone

    tower = tmp_path / "siglip"
    build_vision_backbone(tiny_vision_config("siglip")).save_pretrained(tower)
    SiglipImageProcessorPil(size={"height": 48, "width": 48}).save_pretrained(tower)
    white = rgb((70, 50), (255, 255, 255))
    processor = CromeProcessor.from_backbones(tiny_backbones[0], str(tower))
    pixels = processor(images=[white], text="<image>\nwhat?")["pixel_values"]
    torch.testing.assert_close(pixels, torch.ones(1, 3, 32, 32))  # (1 - 0.5) / 0.5, at the config's 32 pixels
    from_config = CromeProcessor.from_backbones(tiny_backbones[0], tiny_vision_config("siglip"))
    clip_white = (1.0 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]
    )
    pixels = from_config(images=[white], text="<image>\nwhat?")["pixel_values"]
    torch.testing.assert_close(pixels[0, :, 0, 0], clip_white, atol=1e-3, rtol=0)
    SiglipImageProcessorPil(do_normalize=False).save_pretrained(tower)  # a tower trained on pixels in [0, 1]
    unnormalised = CromeProcessor.from_backbones(tiny_backbones[0], str(tower))
    black = rgb((70, 50), (0, 0, 0))  # 0, where SigLIP's normalisation gives -1
    pixels = unnormalised(images=[black], text="<image>")["pixel_values"]
    torch.testing.assert_close(pixels, torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("processor_class", [LavinProcessor, CromeProcessor])
def test_keywords_the_processors_do_not_take_are_refused(tiny_backbones, processor_class):
    """A keyword that is no option of the processor (a misspelt one, the model's `num_query_tokens`) was dropped
    silently by from_backbones and by the constructor; now it is refused with what they take."""
    with pytest.raises(TypeError, match=r"\['num_query_tokens'\].*max_length.*token"):
        processor_class.from_backbones(*tiny_backbones, num_query_tokens=4)
    with pytest.raises(TypeError, match=r"\(did you mean 'overflow' for 'overflw', 'token' for 'tokn'\?\)"):
        processor_class.from_backbones(*tiny_backbones, overflw="truncate_left", tokn="x")
    built = processor_class.from_backbones(*tiny_backbones, max_length=40, overflow="truncate_left")
    assert (built.max_length, built.overflow) == (40, "truncate_left")
    parts = {name: getattr(built, name) for name in built.get_attributes()}
    with pytest.raises(TypeError, match="bogus"):
        processor_class(**parts, bogus=1)


@pytest.mark.parametrize("processor_class", [LavinProcessor, CromeProcessor])
def test_processor_backbones_in_the_other_order_or_without_a_tokenizer_are_named(
    tiny_backbones, tmp_path, processor_class
):
    """Before: "Couldn't instantiate the backend tokenizer ... You need to have sentencepiece or tiktoken installed"
    for backbones given in the other order, and for an LLM folder without its tokenizer."""
    import shutil

    llm, vision = tiny_backbones
    with pytest.raises(
        ValueError, match="not the config of a language model.*the order is text_model, vision_model"
    ):
        processor_class.from_backbones(vision, llm)
    bare = tmp_path / "llm"
    shutil.copytree(
        llm, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json", "chat_template*")
    )
    with pytest.raises(
        ValueError, match=f"No tokenizer could be loaded from '{re.escape(str(bare))}'.*its tokenizer"
    ):
        processor_class.from_backbones(str(bare), vision)


def test_a_shipped_image_processor_of_another_size_than_the_tower_is_replaced(tiny_backbones, tmp_path):
    """A tower whose shipped image processor crops to another size than its config's image_size (a CLIP tower at 32
    pixels with a 48-pixel processor here): LaVIN's processor resizes to the tower's size with the shipped statistics.
    Before: it kept the shipped one, and every image was refused by the model (or, for a SigLIP tower, stopped
    inside torch)."""
    import shutil

    from transformers import CLIPImageProcessorPil

    from mmadapters import LavinForConditionalGeneration

    tower = tmp_path / "tower"
    shutil.copytree(tiny_backbones[1], tower)
    CLIPImageProcessorPil(
        size={"shortest_edge": 48},
        crop_size={"height": 48, "width": 48},
        image_mean=[0.25] * 3,
        image_std=[0.5] * 3,
    ).save_pretrained(tower)
    processor = LavinProcessor.from_backbones(tiny_backbones[0], str(tower))
    white = processor(images=[rgb((70, 50), (255, 255, 255))], text="Image: <image>\nwhat?")
    torch.testing.assert_close(white["pixel_values"], torch.full((1, 3, 32, 32), 1.5))
    model = LavinForConditionalGeneration.from_backbones(tiny_backbones[0], str(tower))
    assert model(**white).logits.shape[:2] == white["input_ids"].shape


def test_the_processors_read_each_backbone_file_once(tiny_backbones, monkeypatch):
    """CROME's fresh Q-Former tokenizer was a second read of the LLM's tokenizer files (now a copy taken before
    `<image>` is added to the LLM's), and LaVIN's official preprocessing read the tower's image processor it then
    replaced."""
    import copy

    from transformers import AutoImageProcessor, AutoTokenizer

    reads = []
    read_tokenizer, read_image_processor = AutoTokenizer.from_pretrained, AutoImageProcessor.from_pretrained
    monkeypatch.setattr(
        AutoTokenizer, "from_pretrained", lambda *a, **k: reads.append("tokenizer") or read_tokenizer(*a, **k)
    )
    monkeypatch.setattr(
        AutoImageProcessor,
        "from_pretrained",
        lambda *a, **k: reads.append("image processor") or read_image_processor(*a, **k),
    )
    crome = CromeProcessor.from_backbones(*tiny_backbones)
    assert reads.count("tokenizer") == 1
    llm = read_tokenizer(tiny_backbones[0])
    assert crome.qformer_tokenizer.get_vocab() == llm.get_vocab()  # the LLM's, without `<image>`
    assert crome.image_token not in crome.qformer_tokenizer.get_vocab()
    text = ["what colour?", "a longer question about the shape"]
    assert crome.qformer_tokenizer(text)["input_ids"] == copy.deepcopy(llm)(text)["input_ids"]
    reads.clear()
    LavinProcessor.from_backbones(*tiny_backbones, official_preprocessing=True)
    assert reads == ["tokenizer"]
    reads.clear()
    LavinProcessor.from_backbones(*tiny_backbones)
    assert sorted(reads) == ["image processor", "tokenizer"]


def test_a_data_set_image_column_with_missing_images(processor):
    """`images=[None, image]` (a data set's image column, some rows without an image) is one entry per sample:
    before, the None counted as an image ("Got 2 image(s) but the text holds 1"), and datasets' lazy Column was
    refused as an image of type Column."""
    rows = datasets.Dataset.from_dict(
        {"image": [None, rgb(), None], "prompt": ["Image: N/A\na", "Image: <image>\nb", "Image: N/A\nc"]}
    ).cast_column("image", datasets.Image())
    expected = processor(images=[[], [rgb()], []], text=list(rows["prompt"]))
    for images in (rows["image"], [None, rgb(), None], (None, [rgb()], None)):
        out = processor(images=images, text=rows["prompt"])
        assert torch.equal(out["input_ids"], expected["input_ids"])
        assert torch.equal(out["pixel_values"], expected["pixel_values"])
    # The image in the wrong sample is named, never moved to another sample's placeholder.
    with pytest.raises(
        ImageTokenMismatchError, match=r"Images per sample \[1, 0, 0\] do not match .* \[0, 1, 0\]"
    ):
        processor(images=[rgb(), None, None], text=rows["prompt"])
    with pytest.raises(ImageTokenMismatchError, match="one entry per prompt, but it has 2 entries for 3"):
        processor(images=[None, rgb()], text=rows["prompt"])
