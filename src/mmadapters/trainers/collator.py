"""Collators: examples -> training batches, through the model's processor.

An example is a dict with `prompt` (text holding one `<image>` placeholder per image), `target` (the answer to
supervise), and `image` (a path, a PIL image, bytes, or None for a text-only sample); the data sets of
`mmadapters.data` have these columns. Batches may mix image and text-only samples:
that is LaVIN's mixture-of-modality training.

Labels (built by the processor): the answer and EOS are supervised; the prompt, the image tokens and the padding
are -100. Truncation policy: a sample longer than `max_length` loses tokens from its end
(`overflow="truncate_right"`: the tail of a long answer first); a sample whose image tokens would be cut is refused
with `PromptTooLongError`, never silently broken. Use `overflow="raise"` to refuse every over-long sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class VisionLanguageCollator:
    """Builds training batches with a `LavinProcessor` or `CromeProcessor`."""

    processor: Any
    max_length: int | None = None
    overflow: str = "truncate_right"

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        for index, example in enumerate(examples):
            missing = [key for key in ("prompt", "target") if key not in example]
            if missing:
                raise KeyError(
                    f"Example {index} has no {missing}; examples need 'prompt', 'target' and 'image'."
                )
        images = [[] if example.get("image") is None else [example["image"]] for example in examples]
        batch = self.processor(
            images=images,
            text=[example["prompt"] for example in examples],
            answers=[example["target"] for example in examples],
            max_length=self.max_length,
            overflow=self.overflow,
        )
        return dict(batch)
