"""What LaVIN's and CROME's processors share: chat-template flattening, image collection and validation,
length policy and padding. Each processor keeps its own layout and outputs."""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import (
    CONFIG_MAPPING,
    AutoImageProcessor,
    AutoTokenizer,
    BatchFeature,
    CLIPImageProcessorPil,
    GenerationConfig,
    PreTrainedConfig,
    ProcessorMixin,
)
from transformers.utils import PaddingStrategy, cached_file

from ..atomic import atomic_directory
from ..checkpoint_files import check_checkpoint_kind
from ..errors import MMAdaptersError, closest_names
from ..hub.remote_code import processor_auto_map, write_loader
from ..modeling.backbones import (
    IMAGE_TOKEN,
    add_image_token,
    backbone_config,
    check_patch_token_tower,
    read_checkpoint_config,
    text_model_class,
    vision_config_of,
)
from ..modeling.embedded import resolve_backbone_name
from ..modeling.image_tokens import ImageTokenMismatchError, check_num_image_tokens
from ..modeling.loading import HUB_KEYWORDS
from ..modeling.vision_layout import square_side
from ..validation import check_positive_int
from .images import load_image

IGNORE_INDEX = -100
OVERFLOW_POLICIES = ("raise", "truncate_left", "truncate_right")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Rewrites a multimodal conversation into plain-text messages, then hands them to the LLM's own template:
# an image part becomes IMAGE_TEXT; a conversation without any image starts its first user turn with
# TEXT_ONLY_PREFIX (when there is one).
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
      {%- if part['type'] == 'image' -%}{%- set parts.text = parts.text + IMAGE_TEXT -%}
      {%- elif part['type'] == 'text' -%}{%- set parts.text = parts.text + part['text'] -%}
      {%- endif -%}
    {%- endfor -%}
    {%- set text = parts.text -%}
  {%- endif -%}
  {%- if message['role'] == 'user' and ns.first_user -%}
    {%- if not ns.has_image -%}{%- set text = TEXT_ONLY_PREFIX + text -%}{%- endif -%}
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

# LaVIN's official instruction format (the official instruction data and MME evaluation): one user turn renders as
# "Image: <image> Instruction: {question}\nResponse: " (text only: "Image: N/A Instruction: ..."), the head in
# front of the instruction, as the official code puts it; for `official_tokenization`.
_OFFICIAL_INSTRUCTION_TEMPLATE = """\
{%- for message in messages -%}
  {%- if message['role'] == 'system' -%}{{ message['content'] + '\\n' }}
  {%- elif message['role'] == 'user' -%}
    {%- set content = message['content'] -%}
    {%- if content.startswith(IMAGE_TEXT) -%}{{ IMAGE_TEXT }}{%- set content = content[IMAGE_TEXT|length:] -%}
    {%- elif content.startswith(TEXT_ONLY_PREFIX) -%}{{ TEXT_ONLY_PREFIX }}{%- set content = content[TEXT_ONLY_PREFIX|length:] -%}
    {%- endif -%}
    {{ 'Instruction: ' + content + '\\n' }}
  {%- elif message['role'] == 'assistant' -%}{{ 'Response: ' + message['content'] + eos_token + '\\n' }}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ 'Response: ' }}{%- endif -%}
"""


def official_instruction_chat_template() -> str:
    """LaVIN's official "Image: <image> Instruction: ...\nResponse: " layout as a chat template."""
    return _flattening_then("Image: <image> ", "Image: N/A ", _OFFICIAL_INSTRUCTION_TEMPLATE)


# LaVIN's question-answer layout as a chat template, for checkpoints trained on it (the quickstart's easy-vqa
# prompts): chat and the demo then prompt the model exactly as it was trained. One turn renders as
# "Image: <image>\nQuestion: What shape is this?\nAnswer:"; later turns append " answer\nQuestion: ...\nAnswer:".
_QUESTION_ANSWER_TEMPLATE = """\
{%- for message in messages -%}
  {%- if message['role'] == 'system' -%}{{ message['content'] + '\\n' }}
  {%- elif message['role'] == 'user' and message['content'].startswith('Image: ') -%}
    {%- set head, question = message['content'].split('\\n', 1) -%}
    {{ head + '\\nQuestion: ' + question + '\\nAnswer:' }}
  {%- elif message['role'] == 'user' -%}{{ 'Question: ' + message['content'] + '\\nAnswer:' }}
  {%- elif message['role'] == 'assistant' -%}{{ ' ' + message['content'] + '\\n' }}
  {%- endif -%}
{%- endfor -%}
"""


def question_answer_chat_template() -> str:
    """LaVIN's "Image: ...\nQuestion: ...\nAnswer:" layout as a chat template (set it as a processor's
    `chat_template` when a model is trained on that layout rather than the LLM's chat format)."""
    return _flattening_then("Image: <image>\n", "Image: N/A\n", _QUESTION_ANSWER_TEMPLATE)


class PromptTooLongError(MMAdaptersError, ValueError):
    """A prompt (plus answer) is longer than `max_length` and the overflow policy is "raise"."""


class InvalidTextError(MMAdaptersError, TypeError):
    """`text` or `answers` given to a processor is not a string or a list of strings (a number, a None row)."""


def build_chat_template(tokenizer: Any, image_text: str, text_only_prefix: str) -> str | dict[str, str]:
    """Our message flattening in front of the LLM's own chat template (or a plain one). An LLM with several named
    templates (Command-R's and Hermes' "default", "tool_use", "rag") keeps them all, each behind the flattening, so
    that `apply_chat_template(..., chat_template="tool_use")` picks one by name as in transformers; the first one
    is also "default" when none has that name (transformers' processors need one)."""
    llm_template = tokenizer.chat_template
    if isinstance(llm_template, dict) and llm_template:
        named = {name: _flattening_then(image_text, text_only_prefix, t) for name, t in llm_template.items()}
        return {"default": next(iter(named.values())), **named}
    return _flattening_then(image_text, text_only_prefix, llm_template or _PLAIN_TEMPLATE)


def _flattening_then(image_text: str, text_only_prefix: str, template: str) -> str:
    """The message flattening (with its two texts set) in front of `template`."""
    header = (
        f"{{%- set IMAGE_TEXT = {image_text!r} -%}}{{%- set TEXT_ONLY_PREFIX = {text_only_prefix!r} -%}}\n"
    )
    return header + _FLATTEN_MESSAGES + template


def resize_only_image_processor(size: int, mean: list[float], std: list[float]) -> CLIPImageProcessorPil:
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


def image_processor_for(
    shipped: Any | None,
    vision_config: PreTrainedConfig,
    mean: list[float] = CLIP_MEAN,
    std: list[float] = CLIP_STD,
) -> Any:
    """The image processor the vision backbone ships (`shipped`, None: none) when it gives one image of the tower's
    size per image, else resize-only at the tower's resolution with the shipped processor's statistics (the tower was
    trained with them): SmolVLM's / Idefics3's processors split images into tiles, and a processor may crop to another
    size than the tower's config takes, but LaVIN feeds one image of that size. `vision_config`: the tower's config."""
    size = square_side(vision_config, "image_size")
    if shipped is not None and output_shape_of(shipped) == (1, 3, size, size):
        return shipped
    mean, std = image_statistics(shipped, mean, std)
    return resize_only_image_processor(size, mean, std)


def output_shape_of(image_processor: Any) -> tuple[int, ...] | None:
    """The shape of `image_processor`'s pixel values for one small blank image (None: it cannot take one), e.g.
    (1, 3, 224, 224); tiling processors return (1, tiles, 3, height, width)."""
    try:
        pixel_values = image_processor(images=[np.zeros((24, 40, 3), dtype=np.uint8)], return_tensors="pt")
    except (ValueError, TypeError):
        return None  # one that cannot take a plain RGB array cannot serve the processors either
    return tuple(pixel_values["pixel_values"].shape)


def llm_tokenizer(
    text_model: str | os.PathLike,
    text_config: PreTrainedConfig,
    revision: str | None = None,
    **hub_kwargs: Any,
) -> Any:
    """The LLM's tokenizer, from its folder or Hub repo (`text_config`: its config; `hub_kwargs`: `token`,
    `cache_dir`, ...); a text backbone that is no language model (backbones given in the other order) and a folder
    without a tokenizer are named (transformers' message for both suggests installing sentencepiece)."""
    text_model_class(text_config)
    try:
        return AutoTokenizer.from_pretrained(text_model, revision=revision, **hub_kwargs)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0]
        raise ValueError(
            f"No tokenizer could be loaded from '{text_model}': the LLM's folder or Hub repo must hold its tokenizer "
            f"(tokenizer.json / tokenizer_config.json). transformers said: {reason}"
        ) from error


def shipped_image_processor(
    vision_model: str | os.PathLike | PreTrainedConfig, revision: str | None = None, **hub_kwargs: Any
) -> Any | None:
    """The image processor the vision backbone ships (None: none, or the backbone is given as a config)."""
    if isinstance(vision_model, PreTrainedConfig):
        return None
    try:
        return AutoImageProcessor.from_pretrained(vision_model, revision=revision, **hub_kwargs)
    except (OSError, ValueError):
        return None


@dataclass
class ProcessorBackbones:
    """What a processor is built from: the LLM (its folder or Hub id, config and tokenizer) and the vision tower
    (its config, and the image processor it ships: None when it ships none or is given as a config)."""

    text_model: str | os.PathLike
    text_config: PreTrainedConfig
    tokenizer: Any
    vision_config: PreTrainedConfig
    shipped_image_processor: Any | None


def read_processor_backbones(
    processor_name: str,
    text_model: str | os.PathLike,
    vision_model: str | os.PathLike | PreTrainedConfig,
    revision: str | None,
    vision_revision: str | None,
    hub_kwargs: dict[str, Any],
    read_shipped_image_processor: bool = True,
) -> ProcessorBackbones:
    """Read the backbones' configs, the LLM's tokenizer and the tower's shipped image processor (unless the
    processor will not use it: `read_shipped_image_processor=False`), each file once, at the backbone's revision
    with the Hub keywords given (a private or gated LLM needs `token`)."""
    text_model = resolve_backbone_name(text_model) if isinstance(text_model, str) else text_model
    vision_model = resolve_backbone_name(vision_model) if isinstance(vision_model, str) else vision_model
    if isinstance(text_model, PreTrainedConfig):
        raise ValueError(f"{processor_name} needs a tokenizer: pass the LLM as a Hub id or a local folder.")
    text_config = backbone_config(text_model, revision, "text", hub_kwargs)
    if isinstance(vision_model, PreTrainedConfig):
        vision_config = vision_config_of(vision_model)
    else:
        vision_config = vision_config_of(backbone_config(vision_model, vision_revision, "vision", hub_kwargs))
    check_patch_token_tower(vision_config)  # its resolution and patch count size the images
    return ProcessorBackbones(
        text_model=text_model,
        text_config=text_config,
        tokenizer=llm_tokenizer(text_model, text_config, revision, **hub_kwargs),
        vision_config=vision_config,
        shipped_image_processor=(
            shipped_image_processor(vision_model, vision_revision, **hub_kwargs)
            if read_shipped_image_processor
            else None
        ),
    )


def processor_options(processor_class: type) -> list[str]:
    """The options a processor's constructor takes besides its tokenizers and image processor."""
    components = set(processor_class.get_attributes())
    return [
        name
        for name in inspect.signature(processor_class.__init__).parameters
        if name not in components | {"self"}
    ]


def take_processor_keywords(
    processor_class: type, kwargs: dict[str, Any], where: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split `from_backbones` keywords into the processor's options and the Hub keywords (`token`, `cache_dir`,
    ...); any other keyword is refused (it used to be dropped)."""
    hub_kwargs = {name: kwargs.pop(name) for name in HUB_KEYWORDS if name in kwargs}
    options = processor_options(processor_class)
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise TypeError(
            f"{where} got unexpected keyword argument(s) {unknown}{closest_names(unknown, [*options, *HUB_KEYWORDS])}; "
            "it takes the processor's options "
            f"({', '.join(options)}) and the Hub keywords ({', '.join(HUB_KEYWORDS)})."
        )
    return kwargs, hub_kwargs


def image_statistics(image_processor: Any | None, mean: list[float], std: list[float]) -> tuple[list, list]:
    """The normalisation `image_processor` applies (the tower was trained with it), else `mean` / `std`."""
    if getattr(image_processor, "do_normalize", True) is False:  # pixels in [0, 1], as the tower was trained
        return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    return (
        getattr(image_processor, "image_mean", None) or mean,
        getattr(image_processor, "image_std", None) or std,
    )


PROCESSOR_FILES = ("processor_config.json", "tokenizer_config.json", "tokenizer.json")


def has_saved_processor(
    name_or_path: str, revision: str | None = None, subfolder: str = "", **hub_kwargs: Any
) -> bool:
    """Whether a checkpoint folder or Hub repo holds processor or tokenizer files."""
    if os.path.isdir(name_or_path):
        return any(os.path.isfile(os.path.join(name_or_path, subfolder, name)) for name in PROCESSOR_FILES)
    return any(
        cached_file(
            name_or_path,
            name,
            revision=revision,
            subfolder=subfolder,
            _raise_exceptions_for_missing_entries=False,  # None for a file the repo does not hold
            **hub_kwargs,
        )
        is not None
        for name in PROCESSOR_FILES
    )


# Tokenizer settings that a processor's `from_pretrained` applies to a tokenizer it rebuilds from the backbones, as
# transformers' tokenizers take them at load time.
TOKENIZER_SETTINGS = (
    "model_max_length",
    "truncation_side",
    "clean_up_tokenization_spaces",
    "split_special_tokens",
)


def apply_load_settings(processor: Any, settings: dict[str, Any]) -> None:
    """Apply the settings given to `from_pretrained` to a processor rebuilt from its backbones, as transformers
    applies them to a saved processor's parts: image-processor settings (its `valid_kwargs`: `size`, `image_mean`,
    ...) through the image processor's `from_dict`, `TOKENIZER_SETTINGS` to each tokenizer. Other keywords are the
    model's loading keywords (`dtype`, `attn_implementation`, ...), which transformers' pipeline passes to the
    processor too and which transformers' processors ignore."""
    image_processor = processor.image_processor
    valid = getattr(getattr(type(image_processor), "valid_kwargs", None), "__annotations__", {})
    image_settings = {k: v for k, v in settings.items() if k in valid}
    if image_settings:
        processor.image_processor = type(image_processor).from_dict(
            image_processor.to_dict(), **image_settings
        )
    for attribute in processor.get_attributes():
        if attribute.endswith("tokenizer"):
            for name in TOKENIZER_SETTINGS:
                if name in settings:
                    setattr(getattr(processor, attribute), name, settings[name])


def plain_rows(batch: BatchFeature, keep_padding: bool = False) -> BatchFeature:
    """A padded batch as plain lists, one row per sample, without its padding unless `keep_padding` (each
    token-level field cut where its attention mask is 0: `qformer_*` fields by `qformer_attention_mask`, the others
    by `attention_mask`), one array per image for `pixel_values`: what transformers' processors return without
    `return_tensors`."""
    rows = {}
    for name, value in batch.items():
        if name == "pixel_values":
            rows[name] = list(value.numpy())
            continue
        if keep_padding:
            rows[name] = value.tolist()
            continue
        mask = batch["qformer_attention_mask" if name.startswith("qformer_") else "attention_mask"].bool()
        rows[name] = [row[keep].tolist() for row, keep in zip(value, mask, strict=True)]
    return BatchFeature(data=rows)


def _check_rows_stack(data: dict[str, Any]) -> None:
    """Rows of one field that differ in length cannot become one tensor (padding=False on a batch of unequal
    samples): say so, rather than torch's "expected sequence of length"."""
    for name, rows in data.items():
        if isinstance(rows, list) and rows and isinstance(rows[0], list) and len({len(r) for r in rows}) > 1:
            raise ValueError(
                f"padding=False left the batch's {name} rows of different lengths "
                f"({sorted({len(r) for r in rows})}), which cannot become one tensor: pass padding=True, or "
                "return_tensors=None for plain lists."
            )


def check_padding_side_at_load(kwargs: dict[str, Any]) -> None:
    """`padding_side` given to `from_pretrained`: the processors pad each call themselves (left without answers,
    ready for generate; right with answers) and keep the tokenizer's side left for transformers' pipeline. "left"
    (what TRL passes) is what they do; "right" would be dropped, so it is refused with the call keyword to use."""
    padding_side = kwargs.pop("padding_side", "left")
    if padding_side != "left":
        raise ValueError(
            f"padding_side={padding_side!r} at load time is not supported: the processor pads each call itself (left "
            "for generate, right with answers=). Pass it per call: processor(..., padding_side='right')."
        )


def check_overflow_policy(overflow: str) -> str:
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    return overflow


# transformers' markers around each control token found in the user's own text by `apply_chat_template(...,
# sanitize_control_tokens=True)` (`mark_control_tokens`), which then hands the marked prompt to the processor with
# `sanitize_control_tokens=True`. A marked `<image>` is the user's text, not a placeholder. (Private names there;
# tests/test_processing.py checks that they still match.)
CONTROL_MARK_START, CONTROL_MARK_END = "\U000f0000", "\U000f0001"
_UNMARKED_IMAGE_TOKEN = re.compile(f"(?<!{CONTROL_MARK_START}){re.escape(IMAGE_TOKEN)}")


def placeholders_in(text: str, sanitized: bool) -> int:
    """How many image placeholders `text` holds (with `sanitized`, those the user wrote do not count)."""
    return len(_UNMARKED_IMAGE_TOKEN.findall(text)) if sanitized else text.count(IMAGE_TOKEN)


def without_placeholders(text: str, sanitized: bool) -> str:
    """`text` without its image placeholders; with `sanitized`, the user's own `<image>` and other control tokens
    stay, as text without transformers' marks."""
    if not sanitized:
        return text.replace(IMAGE_TOKEN, "")
    return _UNMARKED_IMAGE_TOKEN.sub("", text).replace(CONTROL_MARK_START, "").replace(CONTROL_MARK_END, "")


def takes_sanitized_text() -> bool:
    """Whether transformers' processors mark the user's control tokens (`apply_chat_template(...,
    sanitize_control_tokens=True)`) and their tokenizers encode marked text; 5.25 does, 5.20 does not."""
    return "sanitize_control_tokens" in inspect.signature(ProcessorMixin.apply_chat_template).parameters


def special_tokens_around(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (Llama: BOS before; T5: EOS after)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    starts = [i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain]
    # a tokenizer that encodes the text otherwise with its specials: they are taken as standing before it
    start = starts[0] if starts else len(full) - len(plain)
    return full[:start], full[start + len(plain) :]


def _padding_keywords(kwargs: dict[str, Any]) -> tuple[str, str | None, int | None]:
    """transformers' `padding` (as one of "longest", "max_length", "do_not_pad"), `padding_side` and
    `pad_to_multiple_of`, taken out of a processor call's keywords."""
    padding = kwargs.pop("padding", True)
    try:
        strategy = PaddingStrategy({True: "longest", False: "do_not_pad"}.get(padding, padding)).value
    except (ValueError, TypeError):
        raise ValueError(
            f"padding={padding!r} is not supported: pass True / 'longest' (the batch's longest sample, the "
            "default), 'max_length' (every sample to max_length) or False / 'do_not_pad'."
        ) from None
    padding_side = kwargs.pop("padding_side", None)
    if padding_side not in (None, "left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right'; got {padding_side!r}.")
    pad_to_multiple_of = check_positive_int(
        kwargs.pop("pad_to_multiple_of", None), "pad_to_multiple_of", optional=True
    )
    return strategy, padding_side, pad_to_multiple_of


# sample_lengths encodes this many samples at a time (each chunk is padded to its longest sample).
LENGTH_CHUNK = 256


@dataclass
class CheckedInputs:
    """One processor call's inputs after the shared checks, for the method's own encoding (`_model_inputs`)."""

    texts: list[str]
    answers: list[str] | None  # one per prompt: a training batch
    images: list[Any]  # flat, in placeholder order
    add_special_tokens: bool
    max_length: int | None
    overflow: str
    padding_side: str | None = None  # None: ours (left for generation, right with answers)
    pad_to_multiple_of: int | None = None
    padding: str = "longest"  # or "max_length" (every row to max_length), "do_not_pad" (rows as they are)
    # the control tokens the user wrote are marked in the texts (`sanitize_control_tokens`)
    sanitized: bool = False

    def pads_left(self) -> bool:
        return self.answers is None if self.padding_side is None else self.padding_side == "left"


class AdapterProcessorMixin:
    """Shared input handling: `__call__` checks the texts, answers, images and options, builds the pixel values
    and hands the rest to the method's `_model_inputs`. The processor calls `_init_adapter_inputs` in its
    `__init__` and has a `from_backbones` classmethod; `call_options` names its own `__call__` keywords."""

    call_options: tuple[str, ...] = ()
    # The `model_type` of the method's checkpoints ("lavin", "crome"): from_pretrained refuses others'.
    model_type: str = ""

    def _init_adapter_inputs(
        self,
        tokenizer: Any,
        num_image_tokens: int,
        max_length: int | None,
        overflow: str,
        max_image_pixels: int,
    ) -> None:
        self.overflow = check_overflow_policy(overflow)  # before the tokenizer is touched
        self.image_token = IMAGE_TOKEN
        self.image_token_id = add_image_token(tokenizer)
        # Our own calls pad by themselves (left for generation, right with answers). The tokenizer's side is what
        # transformers' pipeline pads its batches with (`batch_size=`), and those batches go to `generate`.
        tokenizer.padding_side = "left"
        self.num_image_tokens = check_positive_int(num_image_tokens, "num_image_tokens")
        self.max_length = check_positive_int(max_length, "max_length", optional=True)
        self.max_image_pixels = check_positive_int(max_image_pixels, "max_image_pixels")

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
                text-only samples), or one entry per sample with None for the text-only ones (a data set's image
                column). Each image: a PIL image, a path, an http(s) URL, base64 (or a data URL), bytes, or a
                uint8 array or tensor ((H, W[, C]) or (C, H, W)); a 4-D array or tensor is a flat list of images.
            text: one prompt or a batch; each needs one `<image>` placeholder per image it uses.
            answers: for training: one answer per prompt; `labels` then supervise only the answer and EOS (-100
                elsewhere) and batches are right-padded; without answers they are left-padded, ready for
                `generate`. The method's layout of prompt and answer: `LavinProcessor`, `CromeProcessor`.
            max_length, overflow: override the processor's length limit and overflow policy for this call.
            **kwargs: the method's own keywords (`call_options`; CROME: `instructions`, what the Q-Former reads).
                Of transformers' processor keywords, `padding` (True / "longest": the batch is padded to its
                longest sample, the default; "max_length": every sample to `max_length`; False / "do_not_pad": no
                padding, so unequal samples need `return_tensors=None`), `padding_side` ("left" / "right";
                default: left without answers, right with them), `pad_to_multiple_of`, `truncation` (True / "longest_first" / "only_first": cut at
                `max_length` on the tokenizer's `truncation_side`, never through an image; False: never cut, as
                overflow="raise"), `sanitize_control_tokens` (set by `apply_chat_template(...,
                sanitize_control_tokens=True)`: the control tokens the user wrote, `<image>` included, are text),
                `return_attention_mask=True` and `videos` / `audio` left None are accepted; anything else is
                refused.
        Returns:
            `BatchFeature` with input_ids, attention_mask, [labels], [pixel_values], and the method's own fields.
        """
        padding, padding_side, pad_to_multiple_of = _padding_keywords(kwargs)
        overflow = self._overflow_for(kwargs.pop("truncation", None), overflow)
        sanitized = self._check_sanitized(kwargs.pop("sanitize_control_tokens", False))
        options = self._check_call_options(kwargs)
        texts = self._check_texts(text)
        inputs = CheckedInputs(
            texts=texts,
            answers=self._check_answers(answers, texts),
            images=self._collect_images(images, texts, sanitized),
            add_special_tokens=add_special_tokens,
            max_length=self._max_length(max_length),
            overflow=overflow,
            padding_side=padding_side,
            pad_to_multiple_of=pad_to_multiple_of,
            padding=padding,
            sanitized=sanitized,
        )
        if padding == "max_length" and inputs.max_length is None:
            raise ValueError(
                f"padding='max_length' needs a length: pass max_length= (neither {type(self).__name__} nor its "
                "tokenizer has one)."
            )
        pixel_values = self._pixel_values(inputs.images)  # bad images are refused before any tokenising
        data = self._model_inputs(inputs, **options)
        if return_tensors is not None and padding == "do_not_pad":  # the only way rows differ in length
            _check_rows_stack(data)
        if pixel_values is not None:
            # return_tensors=None: plain values throughout, as transformers' processors give (one array per image)
            data["pixel_values"] = pixel_values if return_tensors is not None else list(pixel_values.numpy())
        return BatchFeature(data=data, tensor_type=return_tensors)

    @property
    def pad_token_id(self) -> int | None:
        """The id this processor pads with (the tokenizer's pad token, else its end-of-sequence token), read as on a
        tokenizer: transformers' Seq2SeqTrainer pads generated answers with it (`predict_with_generate`), and the
        Trainer counts non-padding tokens by it. transformers' own processors have no such attribute."""
        return self._pad_id()

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's end-of-sequence id (what `pad_token_id` falls back to), read as on a tokenizer."""
        return self.tokenizer.eos_token_id

    def sample_lengths(
        self,
        text: str | list[str],
        answers: str | list[str] | None = None,
        max_length: int | None = None,
        overflow: str | None = None,
    ) -> list[int]:
        """Each sample's length in tokens (its `attention_mask` sum), as `__call__` builds it, without the images:
        they are not needed (each placeholder counts `num_image_tokens`), so none are read or checked. What our
        Trainers' `group_by_length` groups by. A sample that overflow="raise" would refuse is counted whole."""
        texts = self._check_texts(text)
        answer_list = self._check_answers(answers, texts)
        overflow = check_overflow_policy(overflow or self.overflow)
        lengths: list[int] = []
        for start in range(0, len(texts), LENGTH_CHUNK):
            window = slice(start, start + LENGTH_CHUNK)
            inputs = CheckedInputs(
                texts=texts[window],
                answers=None if answer_list is None else answer_list[window],
                images=[],
                add_special_tokens=True,
                max_length=None,
                overflow=overflow,
            )
            lengths += [sum(mask) for mask in self._model_inputs(inputs)["attention_mask"]]
        limit = self._max_length(max_length)
        if limit is None or overflow == "raise":
            return lengths
        return [min(length, limit) for length in lengths]

    def _model_inputs(self, inputs: CheckedInputs, **options: Any) -> dict[str, Any]:
        """The method's token-level fields (input_ids, attention_mask, labels, ...) for `inputs`."""
        raise NotImplementedError

    def _overflow_for(self, truncation: bool | str | None, overflow: str | None) -> str:
        """The overflow policy of a call: `overflow`, or what transformers' `truncation` keyword asks (cut on the
        tokenizer's truncation side, or never cut), or the processor's own; the two keywords must agree."""
        if truncation is None:
            return check_overflow_policy(overflow or self.overflow)
        if truncation not in (True, False, "longest_first", "only_first", "do_not_truncate"):
            raise ValueError(
                f"truncation={truncation!r} is not supported: a processor call encodes single sequences (no "
                "pairs), so it takes True / 'longest_first' / 'only_first' (cut at max_length) or False."
            )
        cuts = truncation not in (False, "do_not_truncate")
        side = getattr(self.tokenizer, "truncation_side", "right")
        asked = ("truncate_left" if side == "left" else "truncate_right") if cuts else "raise"
        if overflow is not None and (overflow != "raise") != cuts:
            raise ValueError(
                f"truncation={truncation!r} and overflow={overflow!r} disagree: pass one of them (overflow says "
                "which end is cut)."
            )
        return check_overflow_policy(overflow or asked)

    def _check_sanitized(self, sanitized: Any) -> bool:
        """`sanitize_control_tokens`: honoured where transformers marks the user's control tokens (see
        `takes_sanitized_text`); refused elsewhere, and with LaVIN's official tokenization (its own encoding)."""
        if not sanitized:
            return False
        if not takes_sanitized_text():
            raise TypeError(
                "sanitize_control_tokens needs a transformers release whose processors' apply_chat_template takes it "
                "(5.25 does; this one does not mark the user's control tokens). Upgrade transformers, or leave it out."
            )
        if getattr(self, "official_tokenization", False):
            raise ValueError(
                "sanitize_control_tokens is not supported with official_tokenization=True (LaVIN's own piecewise "
                "encoding of its fixed layout); leave one of them out."
            )
        return True

    def _tokenize(self, texts: list[str], add_special_tokens: bool, sanitized: bool) -> list[list[int]]:
        """The token ids of prompts (placeholders expanded). Sanitized text is encoded by transformers' tokenizer,
        which turns each marked control token into plain text; it adds no special tokens to such text, so they are
        put around it here as the tokenizer puts them around plain text."""
        if not sanitized:
            return self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        before, after = special_tokens_around(self.tokenizer) if add_special_tokens else ([], [])
        ids = self.tokenizer(texts, add_special_tokens=False, sanitize_control_tokens=True)["input_ids"]
        return [before + row + after for row in ids]

    def _check_call_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The method's own keywords out of `kwargs`; transformers' keywords that match what we do are accepted,
        any other keyword is refused (never silently dropped)."""
        name = type(self).__name__
        for modality in ("videos", "audio"):
            if kwargs.pop(modality, None) is not None:
                raise ValueError(f"{name} takes images and text; got {modality}.")
        if kwargs.pop("return_attention_mask", True) is not True:
            raise ValueError(
                f"{name} always returns attention_mask; return_attention_mask=False is not supported."
            )
        unknown = sorted(set(kwargs) - set(self.call_options))
        if unknown:
            # The keywords `__call__` names, read off its signature so that the message cannot drift from it.
            named = inspect.signature(AdapterProcessorMixin.__call__).parameters
            accepted = [parameter for parameter in named if parameter not in ("self", "kwargs")]
            hint = "For truncation use max_length with truncation=True or overflow='truncate_left' / 'truncate_right'."
            if set(unknown) & set(GenerationConfig().to_dict()):
                # A pipeline hands its unknown keywords to the processor, so they never reach generate.
                hint = (
                    "Generation options belong to generate(); in a pipeline pass them as "
                    "generate_kwargs={...} (or max_new_tokens=...)."
                )
            known = accepted + list(self.call_options)
            raise TypeError(
                f"{name}() got unsupported keyword argument(s) {unknown}{closest_names(unknown, known)}; it takes "
                f"{', '.join(known)}. {hint}"
            )
        return kwargs

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        """Load a saved processor; for an adapter-only checkpoint saved without one (a folder or Hub repo without
        processor files), rebuild it from the backbones named in its config.json (the processor's own options given
        here, e.g. `max_length`, apply to it as they do to a saved one; the Hub keywords reach the backbones' files
        too)."""
        name = os.fspath(pretrained_model_name_or_path)
        # Where the backbones are, when not where the checkpoint names them (as the model's from_pretrained takes
        # it): what a rebuilt processor reads; a saved processor reads no backbone.
        overrides = {role: kwargs.pop(f"{role}_model", None) for role in ("text", "vision")}
        hub_kwargs = {k: kwargs[k] for k in HUB_KEYWORDS if k in kwargs}
        revision, subfolder = kwargs.get("revision"), kwargs.get("subfolder") or ""
        config = read_checkpoint_config(name, revision, subfolder, **hub_kwargs)
        check_checkpoint_kind(name, config, cls.model_type)
        check_padding_side_at_load(kwargs)
        if config is None:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        model_config = CONFIG_MAPPING[config["model_type"]].from_dict(config)
        # num_image_tokens is the model's count: refused if another (a processor saved alone takes it as given).
        if "num_image_tokens" in kwargs:
            check_num_image_tokens(
                kwargs.pop("num_image_tokens"), model_config.num_image_tokens, f"the model of '{name}'"
            )
        if has_saved_processor(name, revision, subfolder, **hub_kwargs):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls._rebuilt_for(name, model_config, kwargs, overrides)

    @classmethod
    def _rebuilt_for(
        cls, name: str, config: Any, kwargs: dict[str, Any], overrides: dict[str, str | None]
    ) -> Any:
        """The processor of checkpoint `name` (its config: `config`), which holds no processor files, rebuilt from
        the backbones its config names (or `overrides`, by role), with the processor's options, the Hub keywords
        and the settings of its parts given here (`apply_load_settings`)."""
        options = processor_options(cls)
        rebuilt = cls._from_recorded_backbones(
            config,
            overrides,
            **{k: v for k, v in kwargs.items() if k in options},
            **{k: kwargs[k] for k in HUB_KEYWORDS if k in kwargs},
        )
        if rebuilt is None:
            raise ValueError(
                f"'{name}' holds no processor files, and its config.json names no backbone folders or Hub ids to "
                "rebuild its processor from (the model was built from config objects). Save the processor with the "
                "model: model.save_pretrained(folder, processor=processor)."
            )
        apply_load_settings(rebuilt, {k: v for k, v in kwargs.items() if k not in options})
        return rebuilt

    @classmethod
    def from_model(cls, model: Any, **kwargs: Any) -> Any:
        """The processor for `model`: built from the backbones its config names (tokenizer with the image token,
        the tower's image processor) and its number of visual tokens. `kwargs`: the processor's options and the
        Hub keywords (`token`, ...), as `from_backbones` takes them."""
        processor = cls._from_recorded_backbones(model.config, {}, **kwargs)
        if processor is None:
            raise ValueError(
                "This model's backbones were built from config objects, so no tokenizer can be found for them: build "
                "the processor with from_backbones(text_model_folder, vision_model_folder)."
            )
        return processor

    @classmethod
    def _from_recorded_backbones(cls, config: Any, overrides: dict[str, str | None], **kwargs: Any) -> Any:
        """A processor built from the backbones a model config records (at their recorded revisions), or from the
        ones `overrides` names by role ("text", "vision"; at their latest revision, as the model's from_pretrained
        takes them); None when neither names both."""
        sources = {}
        for role in ("text", "vision"):
            recorded = getattr(config, f"{role}_backbone") or {}
            if overrides.get(role) is not None:
                sources[role] = (os.fspath(overrides[role]), None)
            elif recorded.get("name_or_path"):
                sources[role] = (recorded["name_or_path"], recorded.get("revision"))
            else:
                return None
        return cls.from_backbones(
            sources["text"][0],
            sources["vision"][0],
            num_image_tokens=config.num_image_tokens,
            revision=sources["text"][1],
            vision_revision=sources["vision"][1],
            **kwargs,
        )

    def save_pretrained(
        self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any
    ) -> Any:
        """`ProcessorMixin.save_pretrained`, atomically: a kill leaves the old processor files or the new ones, and
        the folder's other files (a model saved there) are kept. `push_to_hub=True` is transformers' own path."""
        source = self.tokenizer.name_or_path  # the LLM's folder, or a checkpoint's when loaded from one
        if (
            source
            and os.path.isdir(source)
            and os.path.realpath(source) == os.path.realpath(save_directory)
            and not os.path.isfile(os.path.join(source, "processor_config.json"))  # not a processor's save
        ):
            raise ValueError(
                f"{os.fspath(save_directory)} is the folder the tokenizer was loaded from (the LLM's): saving there "
                "would replace its tokenizer files with this processor's. Save to another folder."
            )
        if push_to_hub:
            return super().save_pretrained(save_directory, push_to_hub=True, **kwargs)
        # processor_config.json names the remote-code loader (AutoProcessor with trust_remote_code=True).
        self.auto_map = processor_auto_map(type(self))
        with atomic_directory(save_directory, replaces=lambda name: False) as staging:
            saved = super().save_pretrained(staging, **kwargs)
            write_loader(staging)
        target = os.path.abspath(save_directory)
        return [os.path.join(target, os.path.relpath(path, staging)) for path in saved or []]

    def apply_chat_template(self, conversation: Any, *args: Any, **kwargs: Any) -> Any:
        """`ProcessorMixin.apply_chat_template`. `return_assistant_tokens_mask=True` is refused up front: the
        labels of a training sample come from the processor's `answers=` (or `VisionLanguageCollator`, which also
        takes TRL's `messages` rows), not from `{% generation %}` markers, which no chat template here has.

        With `tokenize=True` and no `return_tensors` (or transformers' "auto"), the result is what transformers'
        processors give there: plain lists, one unpadded row per conversation (TRL's GRPO and RLOO read each row as
        one whole prompt; our padded tensors put the padding of a shorter prompt inside it). `return_tensors="pt"`
        gives a padded batch."""
        if kwargs.get("return_assistant_tokens_mask"):
            raise TypeError(
                "apply_chat_template(return_assistant_tokens_mask=True) is not supported: build training samples "
                "with processor(images=..., text=prompt, answers=answer) or VisionLanguageCollator (prompt/target "
                "rows, or TRL's messages rows, whose last assistant turn is supervised)."
            )
        if args or not kwargs.get("tokenize") or kwargs.get("return_tensors", "auto") != "auto":
            return super().apply_chat_template(conversation, *args, **kwargs)
        # transformers' default there is no padding; padding given (padding="max_length") pads the lists as asked.
        # The batch is built as tensors and cut back into rows: transformers 5.20 does not pass return_tensors=None
        # on to the processor call. `padding` stays where it was given (keywords or `processor_kwargs`).
        call_kwargs = {**kwargs, "return_dict": True, "return_tensors": "pt"}
        processor_kwargs = dict(kwargs.get("processor_kwargs") or {})
        given_in = processor_kwargs if "padding" in processor_kwargs else call_kwargs
        padding = given_in.pop("padding", False)
        keep_padding = padding not in (False, "do_not_pad")
        if keep_padding:
            given_in["padding"] = padding
        if processor_kwargs:
            call_kwargs["processor_kwargs"] = processor_kwargs
        rows = plain_rows(super().apply_chat_template(conversation, **call_kwargs), keep_padding)
        return rows if kwargs.get("return_dict") else rows["input_ids"]

    @classmethod
    def register_for_auto_class(cls, auto_class: Any = "AutoProcessor") -> None:
        """A no-op (see `FrozenBackbonesPreTrainedModel.register_for_auto_class`)."""

    def _encode(self, text: str) -> list[int]:
        """`text`'s token ids alone (no special tokens)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _answer_ids(self, answer: str) -> list[int]:
        """A training answer's ids: its tokens, then EOS (both supervised)."""
        return self._encode(answer) + [self.tokenizer.eos_token_id]

    def _check_answers(self, answers: str | list[str] | None, texts: list[str]) -> list[str] | None:
        if answers is None:
            return None
        answer_list = self._strings(answers, "answers", "Answer")
        if len(answer_list) != len(texts):
            raise ValueError(
                f"Got {len(answer_list)} answers for {len(texts)} prompts; pass one answer per prompt."
            )
        return answer_list

    def _check_texts(self, text: str | list[str] | None) -> list[str]:
        if text is None:
            raise ValueError(f"{type(self).__name__} needs `text` (or use apply_chat_template).")
        texts = self._strings(text, "text", "Prompt")
        if not texts:
            raise ValueError("text is an empty list: give at least one prompt.")
        for index, prompt in enumerate(texts):
            if not prompt.strip():
                raise ValueError(f"Prompt {index} is empty; every sample needs some text.")
        return texts

    @staticmethod
    def _strings(value: Any, argument: str, item: str) -> list[str]:
        """`value` (a string, or strings in a list, tuple or other iterable: a data set's column) as a list;
        anything else is named."""
        if isinstance(value, str):
            return [value]
        if isinstance(value, (bytes, dict)) or not hasattr(value, "__iter__"):
            raise InvalidTextError(
                f"{argument} must be a string or a list of strings, got {type(value).__name__}."
            )
        strings = list(value)
        for index, entry in enumerate(strings):
            if not isinstance(entry, str):
                raise InvalidTextError(f"{item} {index} is of type {type(entry).__name__}, not a string.")
        return strings

    def _collect_images(self, images: Any, texts: list[str], sanitized: bool = False) -> list[Any]:
        """Images as a flat list in placeholder order, checked against the `<image>` placeholders."""
        placeholders = [placeholders_in(t, sanitized) for t in texts]
        if isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
            images = list(images)  # a data set's column (datasets' Column) is the list it holds
        if isinstance(images, list) and any(item is None for item in images):
            images = self._one_list_per_sample(images, texts)
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
        elif isinstance(images, (list, tuple)) or (
            isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4
        ):  # a flat list, or a 4-D array / tensor holding a batch of images, consumed in placeholder order
            flat = list(images)
        else:  # a single image
            flat = [images]
        if len(flat) != sum(placeholders):
            raise ImageTokenMismatchError(
                f"Got {len(flat)} image(s) but the text holds {sum(placeholders)} `{IMAGE_TOKEN}` placeholder(s). "
                f"Put one `{IMAGE_TOKEN}` per image in the prompt, or build it with apply_chat_template and "
                "{'type': 'image'} content parts."
            )
        return flat

    @staticmethod
    def _one_list_per_sample(images: list, texts: list[str]) -> list[list[Any]]:
        """A list holding None is one entry per sample, None for a sample without an image (a data set's image
        column with missing images): `[None, image]` is `[[], [image]]`. Read as a flat list, its None would count
        as an image and the images would shift to other samples' placeholders."""
        if len(images) != len(texts):
            raise ImageTokenMismatchError(
                f"images holds None (a sample without an image), so it is read as one entry per prompt, but it has "
                f"{len(images)} entries for {len(texts)} prompt(s): give one entry per prompt (None, an image, or a "
                "list of images)."
            )
        return [
            [] if item is None else list(item) if isinstance(item, (list, tuple)) else [item]
            for item in images
        ]

    def _pixel_values(self, flat_images: list[Any]) -> torch.Tensor | None:
        if not flat_images:
            return None
        loaded = [
            load_image(image, self.max_image_pixels, what=f"image {i}") for i, image in enumerate(flat_images)
        ]
        return self.image_processor(loaded, return_tensors="pt")["pixel_values"]

    def _expand_image_tokens(self, texts: list[str], sanitized: bool = False) -> list[str]:
        """Each placeholder as `num_image_tokens` image tokens (with `sanitized`, not those the user wrote)."""
        pattern = _UNMARKED_IMAGE_TOKEN if sanitized else re.compile(re.escape(IMAGE_TOKEN))
        return [pattern.sub(IMAGE_TOKEN * self.num_image_tokens, t) for t in texts]

    def _max_length(self, max_length: int | None) -> int | None:
        check_positive_int(max_length, "max_length", optional=True)
        if max_length or self.max_length:
            return max_length or self.max_length
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
        self, rows: dict[str, list[list[int]]], fills: dict[str, int], inputs: CheckedInputs
    ) -> dict[str, list[list[int]]]:
        """Pad every row of every field to the longest `input_ids` row (or to `max_length` with
        padding="max_length"; rounded up to `pad_to_multiple_of`), on the call's side, or not at all with
        padding="do_not_pad"; adds `attention_mask`."""
        if inputs.padding == "do_not_pad":
            return {**rows, "attention_mask": [[1] * len(ids) for ids in rows["input_ids"]]}
        left = inputs.pads_left()
        longest = max(len(ids) for ids in rows["input_ids"])
        if inputs.padding == "max_length" and inputs.max_length is not None:
            longest = inputs.max_length  # no row is longer: _fit_length cut or refused those
        if inputs.pad_to_multiple_of:
            longest = -(-longest // inputs.pad_to_multiple_of) * inputs.pad_to_multiple_of
        padded: dict[str, list[list[int]]] = {name: [] for name in (*rows, "attention_mask")}
        for index, ids in enumerate(rows["input_ids"]):
            padding = [0] * (longest - len(ids))
            padded["attention_mask"].append(padding + [1] * len(ids) if left else [1] * len(ids) + padding)
            for name, values in rows.items():
                fill = [fills[name]] * (longest - len(ids))
                padded[name].append(fill + values[index] if left else values[index] + fill)
        return padded

    def _pad_id(self) -> int:
        pad_id = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad_id is None else pad_id
