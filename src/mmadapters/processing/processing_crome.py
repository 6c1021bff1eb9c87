"""CROME processor: image processor (CLIP statistics, bicubic 224), the LLM tokenizer and the Q-Former tokenizer.

Layout: each `<image>` placeholder becomes the image's visual tokens (32 queries [+ patches]), the prompt's text
tokens are marked in `prompt_mask` (the adapter's text branch reads only those), and every image gets the
instruction of its sample as Q-Former input (`qformer_input_ids`).
"""

from __future__ import annotations

import copy
import os
from typing import Any, Literal

from transformers import AutoTokenizer, PreTrainedConfig, ProcessorMixin
from transformers.utils import cached_file

from ..modeling.backbones import resolve_checkpoint_folder
from ..modeling.loading import HUB_KEYWORDS
from ..modeling.vision_layout import num_patches, square_side
from ..validation import check_bool, check_positive_int
from .base import (
    CLIP_MEAN,
    CLIP_STD,
    IGNORE_INDEX,
    AdapterProcessorMixin,
    CheckedInputs,
    build_chat_template,
    image_statistics,
    placeholders_in,
    read_processor_backbones,
    resize_only_image_processor,
    take_processor_keywords,
    without_placeholders,
)
from .images import DEFAULT_MAX_IMAGE_PIXELS


def instructblip_qformer_tokenizer(
    name_or_path: str, revision: str | None = None, **hub_kwargs: Any
) -> Any | None:
    """The Q-Former tokenizer an InstructBLIP checkpoint (folder or Hub repo) ships in its `qformer_tokenizer/`
    folder, as transformers' InstructBlipProcessor saves it (BERT's); None when it ships none."""
    if os.path.isdir(name_or_path):
        folder = os.path.join(name_or_path, "qformer_tokenizer")
        return AutoTokenizer.from_pretrained(folder) if os.path.isdir(folder) else None
    shipped = cached_file(
        name_or_path,
        "tokenizer_config.json",
        subfolder="qformer_tokenizer",
        revision=revision,
        _raise_exceptions_for_missing_entries=False,  # None when the repo holds no such file
        **hub_kwargs,
    )
    if shipped is None:
        return None
    # Downloaded with the Hub keywords, then read from the local folder: transformers 5.20's AutoTokenizer does not
    # pass `token` on for a file in a subfolder of a private repo.
    folder = resolve_checkpoint_folder(name_or_path, revision, subfolder="qformer_tokenizer", **hub_kwargs)
    return AutoTokenizer.from_pretrained(folder)


class CromeProcessor(AdapterProcessorMixin, ProcessorMixin):
    """Turns images and text into CROME inputs.

    Args:
        image_processor: resize to the tower's resolution (bicubic, no crop) with the statistics of the image
            processor the tower ships, else CLIP's (`from_backbones`).
        tokenizer: the LLM's tokenizer (`<image>` is added as a special token; the LLM is not resized).
        qformer_tokenizer: the Q-Former's tokenizer (InstructBLIP's BERT tokenizer, or the LLM's for a fresh
            Q-Former).
        num_image_tokens: the model's `config.num_image_tokens` (queries + patches).
        encoder_decoder: the LLM is encoder-decoder (T5): answers become separate decoder `labels`.
        max_length, overflow, max_image_pixels: as for `LavinProcessor`.
        qformer_max_length: the instruction is truncated to this many Q-Former tokens.
    """

    model_type = "crome"

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        qformer_tokenizer: Any = None,
        chat_template: str | dict[str, str] | None = None,
        num_image_tokens: int = 32,
        encoder_decoder: bool = False,
        max_length: int | None = None,
        overflow: Literal["raise", "truncate_left", "truncate_right"] = "raise",
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        qformer_max_length: int = 128,
    ) -> None:
        self._init_adapter_inputs(tokenizer, num_image_tokens, max_length, overflow, max_image_pixels)
        self.encoder_decoder = check_bool(encoder_decoder, "encoder_decoder")
        self.qformer_max_length = check_positive_int(qformer_max_length, "qformer_max_length")
        chat_template = chat_template or build_chat_template(tokenizer, "<image>\n", "")
        super().__init__(image_processor, tokenizer, qformer_tokenizer, chat_template=chat_template)

    @classmethod
    def from_backbones(
        cls,
        text_model: str | os.PathLike,
        vision_model: str | os.PathLike | PreTrainedConfig,
        qformer_tokenizer: Any = None,
        num_image_tokens: int | None = None,
        revision: str | None = None,
        vision_revision: str | None = None,
        **kwargs: Any,
    ) -> CromeProcessor:
        """The processor for a CROME built on these backbones. `num_image_tokens` defaults to 32 queries plus the
        tower's patches (the default patch branch); pass `model.config.num_image_tokens` when in doubt.
        `qformer_tokenizer`: a tokenizer, its folder or Hub id, or an InstructBLIP checkpoint (the tokenizer in its
        `qformer_tokenizer/` folder); default: the LLM's (a fresh Q-Former's)."""
        options, hub_kwargs = take_processor_keywords(cls, kwargs, "CromeProcessor.from_backbones")
        backbones = read_processor_backbones(
            "CromeProcessor", text_model, vision_model, revision, vision_revision, hub_kwargs
        )
        if qformer_tokenizer is None:
            # A fresh Q-Former reads the LLM's tokenizer: a copy taken before the processor adds `<image>` to the
            # LLM's (the Q-Former's vocabulary has no such token), rather than a second read of its files.
            qformer_tokenizer = copy.deepcopy(backbones.tokenizer)
        elif isinstance(qformer_tokenizer, (str, os.PathLike)):
            # A tokenizer's folder or repo, or an InstructBLIP checkpoint (its Q-Former's tokenizer, not its LLM's).
            name = os.fspath(qformer_tokenizer)
            instructblips = instructblip_qformer_tokenizer(name, **hub_kwargs)
            qformer_tokenizer = instructblips or AutoTokenizer.from_pretrained(name, **hub_kwargs)
        vision_config = backbones.vision_config
        if num_image_tokens is None:
            num_image_tokens = 32 + num_patches(vision_config)
        # Resized to the tower's resolution (its patch count fixes the placeholders), normalised as the tower was
        # trained: with the statistics of the image processor it ships, else CLIP's (InstructBLIP's too).
        mean, std = image_statistics(backbones.shipped_image_processor, CLIP_MEAN, CLIP_STD)
        return cls(
            image_processor=resize_only_image_processor(square_side(vision_config, "image_size"), mean, std),
            tokenizer=backbones.tokenizer,
            qformer_tokenizer=qformer_tokenizer,
            num_image_tokens=num_image_tokens,
            encoder_decoder=bool(getattr(backbones.text_config, "is_encoder_decoder", False)),
            **options,
        )

    @classmethod
    def _from_recorded_backbones(cls, config: Any, overrides: dict[str, str | None], **kwargs: Any) -> Any:
        """As for every processor; a Q-Former taken from InstructBLIP (`config.qformer_source`) reads the
        instruction with the Q-Former tokenizer of that checkpoint, as `from_instructblip`'s processor does (the
        LLM's tokenizer gives ids of another vocabulary)."""
        source = getattr(config, "qformer_source", None)
        if source and kwargs.get("qformer_tokenizer") is None:
            kwargs["qformer_tokenizer"] = instructblip_qformer_tokenizer(
                source["name_or_path"],
                source.get("revision"),
                **{k: kwargs[k] for k in HUB_KEYWORDS if k in kwargs},
            )
        return super()._from_recorded_backbones(config, overrides, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return [
            "input_ids",
            "attention_mask",
            "prompt_mask",
            "pixel_values",
            "qformer_input_ids",
            "qformer_attention_mask",
        ]

    call_options = ("instructions",)

    def _model_inputs(
        self, inputs: CheckedInputs, instructions: str | list[str] | None = None
    ) -> dict[str, Any]:
        """input_ids, attention_mask, prompt_mask (1 on the prompt's text tokens, which the adapter's text branch
        reads), [labels], and for the images qformer_input_ids / qformer_attention_mask.

        With answers (training): a decoder-only LLM gets prompt + answer + EOS with `labels` on the answer only; an
        encoder-decoder LLM gets the prompt as input and `labels` = the answer tokens + EOS (the decoder's targets).
        `instructions` (a `__call__` keyword): what the Q-Former reads for each sample's images, one string for
        every sample or one per prompt (default: the prompt without its image placeholders).
        """
        texts, answer_list, overflow = inputs.texts, inputs.answers, inputs.overflow
        if instructions is None:
            instruction_list = [without_placeholders(t, inputs.sanitized).strip() for t in texts]
        elif isinstance(instructions, str):
            instruction_list = [instructions] * len(texts)
        else:
            instruction_list = list(instructions)
            if len(instruction_list) != len(texts) or not all(isinstance(i, str) for i in instruction_list):
                raise ValueError(
                    f"instructions: one string for every sample, or a list of {len(texts)} strings (one per "
                    f"prompt); got {instructions!r:.200}."
                )
        prompt_ids = self._tokenize(
            self._expand_image_tokens(texts, inputs.sanitized), inputs.add_special_tokens, inputs.sanitized
        )

        rows: dict[str, list[list[int]]] = {"input_ids": [], "prompt_mask": []}
        decoder_labels = []
        for index, ids in enumerate(prompt_ids):
            mask = [int(token != self.image_token_id) for token in ids]
            labels = None
            if answer_list is not None:
                answer_ids = self._answer_ids(answer_list[index])
                if self.encoder_decoder:
                    decoder_labels.append(answer_ids)
                else:
                    labels = [IGNORE_INDEX] * len(ids) + answer_ids
                    mask = mask + [0] * len(answer_ids)  # answer tokens never go through the adapter
                    ids = ids + answer_ids
            fitted, labels = self._fit_length(index, ids, labels, inputs.max_length, overflow)
            window = (
                slice(len(ids) - len(fitted), None) if overflow == "truncate_left" else slice(0, len(fitted))
            )
            rows["input_ids"].append(fitted)
            rows["prompt_mask"].append(mask[window])
            if labels is not None:
                rows.setdefault("labels", []).append(labels)

        fills = {"input_ids": self._pad_id(), "prompt_mask": 0, "labels": IGNORE_INDEX}
        data = self._pad(rows, fills, inputs)
        if decoder_labels and inputs.padding == "do_not_pad":
            data["labels"] = decoder_labels
        elif decoder_labels:  # the decoder's targets: padded to the longest answer (their own length)
            longest = max(len(labels) for labels in decoder_labels)
            data["labels"] = [labels + [IGNORE_INDEX] * (longest - len(labels)) for labels in decoder_labels]
        if inputs.images:
            owners = [
                index for index, t in enumerate(texts) for _ in range(placeholders_in(t, inputs.sanitized))
            ]
            qformer = self.qformer_tokenizer(
                [instruction_list[owner] for owner in owners],
                # the Q-Former's own length: its longest instruction, or qformer_max_length (static shapes)
                padding={"longest": True, "max_length": "max_length", "do_not_pad": False}[inputs.padding],
                truncation=True,
                max_length=self.qformer_max_length,
            )
            data["qformer_input_ids"] = qformer["input_ids"]
            data["qformer_attention_mask"] = qformer["attention_mask"]
        return data


__all__ = ["CromeProcessor"]
