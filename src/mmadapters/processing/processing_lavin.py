"""LaVIN processor: image processor + LLM tokenizer + chat template, with input validation.

Prompt layout (LAVIN.md section 4): "Image: " followed by the visual tokens of the image, or "Image: N/A" for a
text-only sample, then the prompt. With a chat LLM the layout sits inside the LLM's own chat template (our
choice: a chat-tuned LLM answers best in its own format), at the start of the first user turn.

Official tokenisation (`official_tokenization=True`, set for converted official checkpoints): the official code
encodes its pieces one by one with SentencePiece, `[BOS] + encode("Image: ") + visual tokens + encode(prompt)`
(text only: `encode("Image: N/A") + encode(prompt)`), and for training `encode(prompt + answer)` in one piece,
supervising what follows the prompt's own length. Each SentencePiece encode adds a word-start "▁" to its piece, so
the prompt's first word is "▁Question", never a newline token followed by "Qu es tion" as one joint encode of
"Image: <image>\nQuestion" gives. Prompts in this mode are written `"Image: <image> " + prompt` or
`"Image: N/A " + prompt` (the space is what the word-start marker stands for); the processor splits them there.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from transformers import PreTrainedConfig, ProcessorMixin

from ..modeling.lavin.configuration_lavin import default_vision_feature_layers
from ..modeling.vision_layout import square_side
from ..validation import check_bool
from .base import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AdapterProcessorMixin,
    CheckedInputs,
    build_chat_template,
    image_processor_for,
    official_instruction_chat_template,
    read_processor_backbones,
    resize_only_image_processor,
    take_processor_keywords,
)
from .images import DEFAULT_MAX_IMAGE_PIXELS

OFFICIAL_IMAGE_HEAD = "Image: <image> "
OFFICIAL_TEXT_HEAD = "Image: N/A "


class LavinProcessor(AdapterProcessorMixin, ProcessorMixin):
    """Turns images and text into LaVIN inputs: validated pixel values, and token ids in which every `<image>`
    placeholder is expanded to `num_image_tokens` image tokens.

    Args:
        image_processor: the vision tower's image processor.
        tokenizer: the LLM's tokenizer (the `<image>` special token is added to it; the LLM is not resized).
        chat_template: default: the LLM's chat template behind LaVIN's "Image: ..." flattening (each of them, by
            name, for an LLM with several).
        num_image_tokens: visual tokens per image (the model's `config.num_image_tokens`, 6 for ViT-L/14).
        max_length: longest accepted sequence in tokens (None: the tokenizer's model_max_length if sane).
        overflow: what to do with a longer sequence: "raise" (default), "truncate_left" (drop the oldest
            tokens) or "truncate_right" (drop the end, e.g. of a long answer). Truncation never cuts an image.
        max_image_pixels: larger images are refused (decompression bombs).
        official_tokenization: tokenise as the official LaVIN code does (see the module docstring): for
            converted official checkpoints and LaVIN's own formats (ScienceQA QCM-ALE, "Instruction: ...").
    """

    model_type = "lavin"

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | dict[str, str] | None = None,
        num_image_tokens: int = 6,
        max_length: int | None = None,
        overflow: Literal["raise", "truncate_left", "truncate_right"] = "raise",
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        official_tokenization: bool = False,
    ) -> None:
        self._init_adapter_inputs(tokenizer, num_image_tokens, max_length, overflow, max_image_pixels)
        self.official_tokenization = check_bool(official_tokenization, "official_tokenization")
        if chat_template is None and official_tokenization:
            chat_template = official_instruction_chat_template()
        chat_template = chat_template or build_chat_template(tokenizer, "Image: <image>\n", "Image: N/A\n")
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_backbones(
        cls,
        text_model: str | os.PathLike,
        vision_model: str | os.PathLike | PreTrainedConfig,
        num_image_tokens: int | None = None,
        official_preprocessing: bool = False,
        revision: str | None = None,
        vision_revision: str | None = None,
        **kwargs: Any,
    ) -> LavinProcessor:
        """The processor for a LaVIN built on these backbones (the same arguments as the model's).

        The image processor is the vision backbone's own when it ships one that gives one image per image, else
        CLIP-style settings at the tower's resolution (with the shipped one's statistics where it tiles images, as
        SmolVLM's does). `official_preprocessing=True` uses the official LaVIN settings instead (224x224
        bicubic, no crop, ImageNet statistics; the
        tower's own resolution for towers other than ViT-L/14 at 224), which converted official checkpoints need.
        """
        options, hub_kwargs = take_processor_keywords(cls, kwargs, "LavinProcessor.from_backbones")
        backbones = read_processor_backbones(
            "LavinProcessor",
            text_model,
            vision_model,
            revision,
            vision_revision,
            hub_kwargs,
            read_shipped_image_processor=not official_preprocessing,  # the official settings replace it
        )
        vision_config = backbones.vision_config
        if official_preprocessing:
            # 224x224 for the official ViT-L/14; the tower's own resolution for other towers.
            image_processor = resize_only_image_processor(
                square_side(vision_config, "image_size"), IMAGENET_MEAN, IMAGENET_STD
            )
        else:
            image_processor = image_processor_for(backbones.shipped_image_processor, vision_config)
        if num_image_tokens is None:
            num_image_tokens = len(default_vision_feature_layers(vision_config.num_hidden_layers))
        return cls(
            image_processor=image_processor,
            tokenizer=backbones.tokenizer,
            num_image_tokens=num_image_tokens,
            **options,
        )

    @classmethod
    def _from_recorded_backbones(cls, config: Any, overrides: dict[str, str | None], **kwargs: Any) -> Any:
        """As for every processor; a checkpoint converted from the official code (`config.official_processing`)
        gets the official preprocessing and tokenisation, as `convert_official_lavin`'s processor has them."""
        if getattr(config, "official_processing", False):
            kwargs.setdefault("official_preprocessing", True)
            kwargs.setdefault("official_tokenization", True)
        return super()._from_recorded_backbones(config, overrides, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    def _model_inputs(self, inputs: CheckedInputs) -> dict[str, Any]:
        """input_ids (each `<image>` expanded to `num_image_tokens` image tokens), attention_mask and, with
        answers, labels: the sequence is prompt + answer + EOS, and only the answer and EOS are supervised."""
        rows: dict[str, list[list[int]]] = {"input_ids": []}
        if inputs.answers is not None:
            rows["labels"] = []
        for index, text in enumerate(inputs.texts):
            answer = None if inputs.answers is None else inputs.answers[index]
            if self.official_tokenization:
                ids, labels = self._official_ids(index, text, answer, inputs.add_special_tokens)
            else:
                ids, labels = self._joint_ids(text, answer, inputs.add_special_tokens, inputs.sanitized)
            ids, labels = self._fit_length(index, ids, labels, inputs.max_length, inputs.overflow)
            rows["input_ids"].append(ids)
            if labels is not None:
                rows["labels"].append(labels)
        return self._pad(rows, {"input_ids": self._pad_id(), "labels": IGNORE_INDEX}, inputs)

    def _joint_ids(
        self, text: str, answer: str | None, add_special_tokens: bool, sanitized: bool
    ) -> tuple[list[int], list[int] | None]:
        """The prompt tokenised in one piece (placeholders expanded), the answer and EOS after it."""
        ids = self._tokenize(self._expand_image_tokens([text], sanitized), add_special_tokens, sanitized)[0]
        if answer is None:
            return ids, None
        answer_ids = self._answer_ids(answer)
        return ids + answer_ids, [IGNORE_INDEX] * len(ids) + answer_ids

    def _official_ids(
        self, index: int, text: str, answer: str | None, add_special_tokens: bool
    ) -> tuple[list[int], list[int] | None]:
        """The official code's ids (module docstring): head, visual tokens and prompt encoded piece by piece; with
        an answer, prompt + answer encoded together and supervised after the prompt's own length, then EOS."""
        if text.startswith(OFFICIAL_IMAGE_HEAD):
            head = self._encode("Image: ") + [self.image_token_id] * self.num_image_tokens
            prompt = text[len(OFFICIAL_IMAGE_HEAD) :]
        elif text.startswith(OFFICIAL_TEXT_HEAD):
            head = self._encode("Image: N/A")
            prompt = text[len(OFFICIAL_TEXT_HEAD) :]
        else:
            raise ValueError(
                f"Prompt {index} does not start with LaVIN's official layout ({OFFICIAL_IMAGE_HEAD!r} or "
                f"{OFFICIAL_TEXT_HEAD!r}), which official_tokenization=True needs: {text[:40]!r}."
            )
        if self.image_token in prompt:
            raise ValueError(
                f"Prompt {index}: LaVIN's official layout has one image, in the head; found another."
            )
        bos = (
            [self.tokenizer.bos_token_id]
            if add_special_tokens and self.tokenizer.bos_token_id is not None
            else []
        )
        prompt_ids = bos + head + self._encode(prompt)
        if answer is None:
            return prompt_ids, None
        ids = bos + head + self._encode(prompt + answer) + [self.tokenizer.eos_token_id]
        return ids, [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids) :]


__all__ = ["LavinProcessor"]
