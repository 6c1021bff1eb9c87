"""Generation-based evaluation: generate answers in batches, extract them, score them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import MMAdaptersError
from ..inference_loading import inputs_on_model_device
from ..processing.base import takes_sanitized_text


def answer_tokens(model: Any, input_ids: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """The answer part of `generate`'s output: a decoder-only LLM returns prompt + answer (the prompt is cut off),
    an encoder-decoder one (CROME on T5) returns the answer only."""
    if getattr(model.config.get_text_config(), "is_encoder_decoder", False):
        return output
    return output[:, input_ids.shape[1] :]


def chat_inputs(processor: Any, messages: list[dict], images: Sequence[Any]) -> Any:
    """The model inputs of a conversation people type (the demo, `mmadapters chat`): the processor's chat template
    with the generation prompt, and `images` for the conversation's image parts, in order. Where transformers can
    (5.25: `sanitize_control_tokens`), the control tokens typed in the text are plain text: a `<image>` is no
    placeholder (it asked for an image that was not there) and a `</s>` or a role marker ends no turn."""
    if not takes_sanitized_text():
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        return processor(images=list(images) or None, text=prompt)
    remaining = iter(images)
    with_images = [
        {
            **message,
            "content": [
                {**part, "image": next(remaining)} if part.get("type") == "image" else part
                for part in message["content"]
            ],
        }
        if isinstance(message["content"], list)
        else message
        for message in messages
    ]
    return processor.apply_chat_template(
        with_images,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        sanitize_control_tokens=True,
    )


class ContextFullError(MMAdaptersError, ValueError):
    """A conversation that leaves no room for an answer in the LLM's context."""


def answer_length(model: Any, prompt_length: int, max_new_tokens: int) -> int:
    """`max_new_tokens` capped to the room the LLM's context has left after the prompt, for the chats (`mmadapters
    chat`, the demo); a `ContextFullError` when there is none: refused at once rather than the model's error after
    a doomed generation. Uncapped when the LLM states no limit (and for an encoder-decoder LLM, whose answer has
    positions of its own)."""
    limit = getattr(model.config.text_config, "max_position_embeddings", None)
    if limit is None or getattr(model, "is_encoder_decoder_llm", False):
        return max_new_tokens
    room = limit - model._position_offset() - prompt_length  # LaVIN's modality token takes position 0
    if room < 1:
        raise ContextFullError(
            f"The conversation is {prompt_length} tokens long and fills the model's context ({limit} positions)"
        )
    return min(max_new_tokens, room)


def progress_bar(
    description: str, total: int | None = None, unit: str = "question", leave: bool = True
) -> tuple[Any, Callable[[int, int], None]]:
    """A tqdm bar (with ETA once its total is known) and the `progress(done, total)` callback that moves it, for
    the evaluation functions' `progress` argument. Close the bar when the evaluation returns."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=description, unit=unit, leave=leave)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return bar, progress


@torch.no_grad()
def generate_answers(
    model: Any,
    processor: Any,
    prompts: Sequence[str],
    images: Sequence[Any],
    batch_size: int = 32,
    max_new_tokens: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Greedy answers (decoded new tokens) for each prompt; `images[i]` is an image or None (text only)."""
    model.eval()
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        stop = min(start + batch_size, len(prompts))
        batch_images = [[] if images[i] is None else [images[i]] for i in range(start, stop)]
        inputs = inputs_on_model_device(processor(images=batch_images, text=list(prompts[start:stop])), model)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers.extend(
            processor.batch_decode(
                answer_tokens(model, inputs["input_ids"], output), skip_special_tokens=True
            )
        )
        if progress is not None:
            progress(stop, len(prompts))
    return answers
