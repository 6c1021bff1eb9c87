"""LaVIN processor: image processor + LLM tokenizer + chat template, with input validation.

Prompt layout (LAVIN.md section 4): "Image: " followed by the visual tokens of the image, or "Image: N/A" for a
text-only sample, then the prompt. With a chat LLM the layout sits inside the LLM's own chat template (our
choice: a chat-tuned LLM answers best in its own format), at the start of the first user turn.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    BatchFeature,
    CLIPImageProcessorPil,
    PreTrainedConfig,
    ProcessorMixin,
)

from ..modeling.backbones import IMAGE_TOKEN, add_image_token, vision_config_of
from ..modeling.lavin.configuration_lavin import default_vision_feature_layers
from ..modeling.lavin.modeling_lavin import ImageTokenMismatchError
from .images import DEFAULT_MAX_IMAGE_PIXELS, load_image

IGNORE_INDEX = -100
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Rewrites a multimodal conversation into plain-text messages, then hands them to the LLM's own template:
# an image part becomes "Image: <image>\n"; a conversation without any image starts with "Image: N/A\n".
_FLATTEN_MESSAGES = """\
{%- set ns = namespace(has_image=false, first_user=true, flat=[]) -%}
{%- for message in messages -%}
  {%- if message['content'] is not string -%}
    {%- for part in message['content'] -%}
      {%- if part['type'] == 'image' -%}{%- set ns.has_image = true -%}{%- endif -%}
    {%- endfor -%}
  {%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
  {%- if message['content'] is string -%}
    {%- set text = message['content'] -%}
  {%- else -%}
    {%- set parts = namespace(text='') -%}
    {%- for part in message['content'] -%}
      {%- if part['type'] == 'image' -%}{%- set parts.text = parts.text + 'Image: <image>\\n' -%}
      {%- elif part['type'] == 'text' -%}{%- set parts.text = parts.text + part['text'] -%}
      {%- endif -%}
    {%- endfor -%}
    {%- set text = parts.text -%}
  {%- endif -%}
  {%- if message['role'] == 'user' and ns.first_user -%}
    {%- if not ns.has_image -%}{%- set text = 'Image: N/A\\n' + text -%}{%- endif -%}
    {%- set ns.first_user = false -%}
  {%- endif -%}
  {%- set ns.flat = ns.flat + [{'role': message['role'], 'content': text}] -%}
{%- endfor -%}
{%- set messages = ns.flat -%}
"""

# For LLMs without a chat template: LaVIN's instruction format.
_PLAIN_TEMPLATE = """\
{%- for message in messages -%}
  {%- if message['role'] == 'system' -%}{{ message['content'] + '\\n' }}
  {%- elif message['role'] == 'user' -%}{{ 'Instruction: ' + message['content'] + '\\n' }}
  {%- elif message['role'] == 'assistant' -%}{{ 'Response: ' + message['content'] + eos_token + '\\n' }}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ 'Response:' }}{%- endif -%}
"""


class PromptTooLongError(ValueError):
    """A prompt (plus answer) is longer than `max_length` and the overflow policy is "raise"."""


def build_chat_template(tokenizer: Any) -> str:
    """LaVIN's chat template: our message flattening in front of the LLM's own template (or a plain one)."""
    llm_template = tokenizer.chat_template
    if isinstance(llm_template, dict):
        llm_template = llm_template.get("default") or next(iter(llm_template.values()))
    return _FLATTEN_MESSAGES + (llm_template or _PLAIN_TEMPLATE)


class LavinProcessor(ProcessorMixin):
    """Turns images and text into LaVIN inputs: validated pixel values, and token ids in which every `<image>`
    placeholder is expanded to `num_image_tokens` image tokens.

    Args:
        image_processor: the vision tower's image processor.
        tokenizer: the LLM's tokenizer (the `<image>` special token is added to it; the LLM is not resized).
        chat_template: default: the LLM's chat template behind LaVIN's "Image: ..." flattening.
        num_image_tokens: visual tokens per image (the model's `config.num_image_tokens`, 6 for ViT-L/14).
        max_length: longest accepted sequence in tokens (None: the tokenizer's model_max_length if sane).
        overflow: what to do with a longer sequence: "raise" (default), "truncate_left" (drop the oldest
            tokens) or "truncate_right" (drop the end, e.g. of a long answer). Truncation never cuts an image.
        max_image_pixels: larger images are refused (decompression bombs).
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        num_image_tokens: int = 6,
        max_length: int | None = None,
        overflow: Literal["raise", "truncate_left", "truncate_right"] = "raise",
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        **kwargs: Any,
    ) -> None:
        if overflow not in ("raise", "truncate_left", "truncate_right"):
            raise ValueError(
                f"overflow must be 'raise', 'truncate_left' or 'truncate_right', got {overflow!r}"
            )
        self.image_token = IMAGE_TOKEN
        self.image_token_id = add_image_token(tokenizer)
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.overflow = overflow
        self.max_image_pixels = max_image_pixels
        super().__init__(
            image_processor, tokenizer, chat_template=chat_template or build_chat_template(tokenizer)
        )

    @classmethod
    def from_backbones(
        cls,
        text_model: str | os.PathLike,
        vision_model: str | os.PathLike | PreTrainedConfig,
        num_image_tokens: int | None = None,
        official_preprocessing: bool = False,
        revision: str | None = None,
        **kwargs: Any,
    ) -> LavinProcessor:
        """The processor for a LaVIN built on these backbones (the same arguments as the model's).

        The image processor is the vision backbone's own when it ships one, else CLIP-style settings at the
        tower's resolution. `official_preprocessing=True` uses the official LaVIN settings instead (224x224
        bicubic, no crop, ImageNet statistics), which converted official checkpoints need.
        """
        if isinstance(text_model, PreTrainedConfig):
            raise ValueError("LavinProcessor needs a tokenizer: pass the LLM as a Hub id or a local folder.")
        tokenizer = AutoTokenizer.from_pretrained(text_model, revision=revision)
        vision_config = vision_config_of(
            vision_model
            if isinstance(vision_model, PreTrainedConfig)
            else AutoConfig.from_pretrained(vision_model)
        )
        if official_preprocessing:
            image_processor = _resize_only_processor(224, IMAGENET_MEAN, IMAGENET_STD)
        elif isinstance(vision_model, PreTrainedConfig):
            image_processor = _resize_only_processor(vision_config.image_size, CLIP_MEAN, CLIP_STD)
        else:
            try:
                image_processor = AutoImageProcessor.from_pretrained(vision_model)
            except (OSError, ValueError):
                image_processor = _resize_only_processor(vision_config.image_size, CLIP_MEAN, CLIP_STD)
        if num_image_tokens is None:
            num_image_tokens = len(default_vision_feature_layers(vision_config.num_hidden_layers))
        return cls(
            image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=num_image_tokens, **kwargs
        )

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> LavinProcessor:
        """Load a saved processor; for an adapter-only checkpoint saved without one, rebuild it from the
        backbones named in its config.json."""
        folder = os.fspath(pretrained_model_name_or_path)
        has_processor = any(
            os.path.isfile(os.path.join(folder, name))
            for name in ("processor_config.json", "tokenizer_config.json", "tokenizer.json")
        )
        if (
            os.path.isdir(folder)
            and not has_processor
            and os.path.isfile(os.path.join(folder, "config.json"))
        ):
            config = AutoConfig.from_pretrained(folder)
            text = (config.text_backbone or {}).get("name_or_path")
            vision = (config.vision_backbone or {}).get("name_or_path")
            if text and vision:
                return cls.from_backbones(text, vision, num_image_tokens=config.num_image_tokens)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        answers: str | list[str] | None = None,
        return_tensors: str | None = "pt",
        add_special_tokens: bool = True,
        max_length: int | None = None,
        overflow: str | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Build model inputs.

        Args:
            images: None, a flat list of images consumed in placeholder order, or one list per sample (empty for
                text-only samples). Each image: a PIL image, a path, bytes or a uint8 array.
            text: one prompt or a batch; each needs one `<image>` placeholder per image it uses.
            answers: for training: one answer per prompt. The sequence becomes prompt + answer + EOS, and
                `labels` supervise only the answer and EOS (-100 on prompt, image tokens and padding). Batches
                are then right-padded; without answers they are left-padded, ready for `generate`.
        Returns:
            `BatchFeature` with input_ids, attention_mask, pixel_values (when there are images), labels.
        """
        if text is None:
            raise ValueError(
                "LavinProcessor needs `text` (use 'Image: <image>\\n...' or apply_chat_template)."
            )
        texts = [text] if isinstance(text, str) else list(text)
        answer_list = None if answers is None else ([answers] if isinstance(answers, str) else list(answers))
        if answer_list is not None and len(answer_list) != len(texts):
            raise ValueError(
                f"Got {len(answer_list)} answers for {len(texts)} prompts; pass one answer per prompt."
            )
        for index, prompt in enumerate(texts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"Prompt {index} is empty; every sample needs some text.")

        pixel_values = self._process_images(images, texts)
        overflow = overflow or self.overflow
        max_length = max_length or self.max_length or self._tokenizer_max_length()
        expanded = [t.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.num_image_tokens) for t in texts]
        prompt_ids = self.tokenizer(expanded, add_special_tokens=add_special_tokens)["input_ids"]

        sequences, label_rows = [], []
        for index, ids in enumerate(prompt_ids):
            labels = None
            if answer_list is not None:
                answer_ids = self.tokenizer(answer_list[index], add_special_tokens=False)["input_ids"]
                answer_ids = answer_ids + [self.tokenizer.eos_token_id]
                labels = [IGNORE_INDEX] * len(ids) + answer_ids
                ids = ids + answer_ids
            ids, labels = self._fit_length(index, ids, labels, max_length, overflow)
            sequences.append(ids)
            label_rows.append(labels)

        data = self._pad(sequences, label_rows if answer_list is not None else None, left=answer_list is None)
        if pixel_values is not None:
            data["pixel_values"] = pixel_values
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _process_images(self, images: Any, texts: list[str]) -> torch.Tensor | None:
        placeholders = [t.count(IMAGE_TOKEN) for t in texts]
        if images is None:
            flat = []
        elif (
            isinstance(images, (list, tuple))
            and images
            and all(isinstance(item, (list, tuple)) or item is None for item in images)
        ):  # one list per sample
            per_sample_counts = [len(item or []) for item in images]
            if per_sample_counts != placeholders:
                raise ImageTokenMismatchError(
                    f"Images per sample {per_sample_counts} do not match the `{IMAGE_TOKEN}` placeholders per "
                    f"prompt {placeholders}; each image needs one placeholder in its prompt."
                )
            flat = [image for item in images for image in (item or [])]
        else:  # a flat list (or a single image), consumed in placeholder order
            flat = list(images) if isinstance(images, (list, tuple)) else [images]
        if len(flat) != sum(placeholders):
            raise ImageTokenMismatchError(
                f"Got {len(flat)} image(s) but the text holds {sum(placeholders)} `{IMAGE_TOKEN}` placeholder(s). "
                f"Put one `{IMAGE_TOKEN}` per image in the prompt, or build it with apply_chat_template and "
                "{'type': 'image'} content parts."
            )
        if not flat:
            return None
        loaded = [
            load_image(image, self.max_image_pixels, what=f"image {index}")
            for index, image in enumerate(flat)
        ]
        return self.image_processor(loaded, return_tensors="pt")["pixel_values"]

    def _tokenizer_max_length(self) -> int | None:
        limit = getattr(self.tokenizer, "model_max_length", None)
        return limit if limit is not None and limit < 1_000_000 else None

    def _fit_length(
        self, index: int, ids: list[int], labels: list[int] | None, max_length: int | None, overflow: str
    ) -> tuple[list[int], list[int] | None]:
        if max_length is None or len(ids) <= max_length:
            return ids, labels
        if overflow == "raise":
            raise PromptTooLongError(
                f"Sample {index} has {len(ids)} tokens, more than max_length={max_length}. Shorten it, raise "
                "`max_length`, or pass overflow='truncate_left' / 'truncate_right'."
            )
        window = slice(len(ids) - max_length, None) if overflow == "truncate_left" else slice(0, max_length)
        kept = ids[window]
        if kept.count(self.image_token_id) != ids.count(self.image_token_id):
            raise PromptTooLongError(
                f"Sample {index} has {len(ids)} tokens; truncating it to max_length={max_length} ({overflow}) would "
                "cut image tokens. Shorten the text or raise `max_length`."
            )
        return kept, None if labels is None else labels[window]

    def _pad(
        self, sequences: list[list[int]], labels: list[list[int]] | None, left: bool
    ) -> dict[str, list[list[int]]]:
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        longest = max(len(ids) for ids in sequences)
        data: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": []}
        if labels is not None:
            data["labels"] = []
        for row, ids in enumerate(sequences):
            padding = longest - len(ids)

            def pad(values: list[int], fill: int, padding: int = padding) -> list[int]:
                return [fill] * padding + values if left else values + [fill] * padding

            data["input_ids"].append(pad(ids, pad_id))
            data["attention_mask"].append(pad([1] * len(ids), 0))
            if labels is not None:
                data["labels"].append(pad(labels[row], IGNORE_INDEX))
        return data


def _resize_only_processor(size: int, mean: list[float], std: list[float]) -> Any:
    """Resize to size x size (bicubic, no crop: nothing at the image border is lost) and normalise."""
    return CLIPImageProcessorPil(
        do_resize=True,
        size={"height": size, "width": size},
        resample=3,  # bicubic
        do_center_crop=False,
        do_rescale=True,
        do_normalize=True,
        image_mean=mean,
        image_std=std,
        do_convert_rgb=True,
    )


__all__ = ["LavinProcessor", "PromptTooLongError", "build_chat_template"]
