"""Collators: examples -> training batches, through the model's processor.

An example is a dict with `prompt` (text holding one `<image>` placeholder per image), `target` (the answer to
supervise), and `image` (a path, a PIL image, bytes, or None for a text-only sample); the data sets of
`mmadapters.data` have these columns. Batches may mix image and text-only samples:
that is LaVIN's mixture-of-modality training.

TRL's conversational rows are accepted too: `messages` (a chat: `{"role": ..., "content": str or
[{"type": "image"}, {"type": "text", "text": ...}]}`) with the image(s) in `images`. The last assistant turn is
the target; the turns before it, rendered with the processor's chat template (the image placeholder where the
`{"type": "image"}` entry is), are the prompt. To supervise every assistant turn, give one row per turn (as
`mmadapters.data.load_llava_conversations` does).

Labels (built by the processor): the answer and EOS are supervised; the prompt, the image tokens and the padding
are -100. Truncation policy: a sample longer than `max_length` loses tokens from its end
(`overflow="truncate_right"`: the tail of a long answer first); a sample whose image tokens would be cut is refused
with `PromptTooLongError`, never silently broken. Use `overflow="raise"` to refuse every over-long sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class VisionLanguageCollator:
    """Builds training batches with a `LavinProcessor` or `CromeProcessor`."""

    # The columns it reads (the Trainer's `remove_unused_columns` keeps them; see AdapterTrainer).
    columns = ("prompt", "target", "image", "messages", "images")

    processor: Any
    max_length: int | None = None
    overflow: str = "truncate_right"
    # Round each batch's length up to a multiple of this (as transformers' collators do; e.g. 8 for tensor cores).
    pad_to_multiple_of: int | None = None
    # False: text-only samples keep their tokens but get no labels (-100), for a loss of their own such as
    # LavinTrainer's `text_distillation` (the quickstart's default; see QuickstartSettings.text_answer_loss).
    supervise_text_only: bool = True
    # transformers' collators' `padding`: True / "longest" (each batch to its longest sample), "max_length" (every
    # batch to `max_length`: static shapes, e.g. for XLA or torch.compile without recompiles).
    padding: bool | str = True

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        examples = [
            example_from_messages(example, self.processor, index) if "messages" in example else example
            for index, example in enumerate(examples)
        ]
        for index, example in enumerate(examples):
            missing = [key for key in ("prompt", "target") if key not in example]
            if missing:
                raise KeyError(
                    f"Example {index} has no {missing}; examples need 'prompt', 'target' and 'image' (or TRL's "
                    "'messages' and 'images')."
                )
        images = [[] if example.get("image") is None else [example["image"]] for example in examples]
        batch = self.processor(
            images=images,
            text=[example["prompt"] for example in examples],
            answers=[example["target"] for example in examples],
            max_length=self.max_length,
            overflow=self.overflow,
            pad_to_multiple_of=self.pad_to_multiple_of,
            padding=self.padding,
        )
        if not self.supervise_text_only and "labels" in batch:
            text_only = torch.tensor([not sample_images for sample_images in images])
            batch["labels"] = batch["labels"].masked_fill(text_only[:, None], -100)
        return dict(batch)

    def sample_lengths(self, rows: Any) -> list[int]:
        """Each row's length in tokens, read from a `datasets.Dataset` without decoding its images: the length of
        the sample this collator builds from it (`processor.sample_lengths`, truncation included). What
        `train_sampling_strategy="group_by_length"` groups by: transformers counts `input_ids`, which raw rows do
        not have."""
        if "prompt" in rows.column_names:
            prompts, targets = rows["prompt"], rows["target"]
        else:  # TRL's conversational rows
            pairs = [prompt_and_target(turns, self.processor) for turns in rows["messages"]]
            prompts, targets = [prompt for prompt, _ in pairs], [target for _, target in pairs]
        return self.processor.sample_lengths(
            prompts, targets, max_length=self.max_length, overflow=self.overflow
        )


def example_from_messages(example: dict[str, Any], processor: Any, index: int = 0) -> dict[str, Any]:
    """A TRL conversational row (`messages` + `images`) as a prompt/target/image example (see the module
    docstring)."""
    messages = example["messages"]
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ValueError(
            f"Example {index}: 'messages' must be a non-empty list of {{'role', 'content'}} turns."
        )
    if messages[-1].get("role") != "assistant":
        raise ValueError(
            f"Example {index}: the last turn of 'messages' must be the assistant's (the target), got "
            f"{messages[-1].get('role')!r}."
        )
    images = example.get("images") or []
    if not isinstance(images, list):
        images = [images]
    placeholders = sum(
        1
        for message in messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, dict) and part.get("type") == "image"
    )
    if placeholders != len(images) or len(images) > 1:
        raise ValueError(
            f"Example {index}: {len(images)} image(s) in 'images' but {placeholders} {{'type': 'image'}} entries in "
            "'messages'; LaVIN and CROME take at most one image per sample, with one image entry where it goes."
        )
    prompt, target = prompt_and_target(messages, processor)
    return {"prompt": prompt, "target": target, "image": images[0] if images else None}


def prompt_and_target(messages: list[dict[str, Any]], processor: Any) -> tuple[str, str]:
    """A conversation's prompt (the turns before the last, through the chat template) and target (the last turn's
    text)."""
    return (
        processor.apply_chat_template(messages[:-1], add_generation_prompt=True),
        _text_of(messages[-1]["content"]),
    )


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(
        part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
    )
