"""transformers' logits processors that read the prompt's token ids, made safe for image placeholders.

`generate(encoder_repetition_penalty=...)` (boost or penalise the prompt's tokens) and
`generate(encoder_no_repeat_ngram_size=...)` (never repeat an n-gram of the prompt) index the next-token logits with
the prompt's ids. Our prompts hold image placeholders whose id lies outside the LLM vocabulary (one past it), so
both stopped with torch's "index 300 is out of bounds for dimension 1". transformers' own repetition penalty and
n-gram ban send such ids to a spare column past the vocabulary, and so do these: a placeholder is never a token the
model can generate, so it is neither boosted nor banned, and the text tokens are treated as transformers treats them.
"""

from __future__ import annotations

import torch
from torch.nn import functional
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    EncoderNoRepeatNGramLogitsProcessor,
    EncoderRepetitionPenaltyLogitsProcessor,
)

PROMPT_READING_PROCESSORS = (EncoderRepetitionPenaltyLogitsProcessor, EncoderNoRepeatNGramLogitsProcessor)


class SpareColumnLogitsProcessor(LogitsProcessor):
    """Runs a prompt-reading processor on the logits with one spare column past the vocabulary, where every id
    outside it (an image placeholder) lands, then drops that column."""

    def __init__(self, processor: LogitsProcessor, vocab_size: int) -> None:
        self.processor = processor
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        width = scores.shape[-1]
        # the spare column's index (the prompt ids were clamped to vocab_size)
        spare = max(width, self.vocab_size)
        padded = functional.pad(scores, (0, spare + 1 - width))
        return self.processor(input_ids.clamp(max=spare), padded)[..., :width]


def placeholder_safe(processors: LogitsProcessorList, vocab_size: int) -> LogitsProcessorList:
    """`processors` with each prompt-reading one wrapped in a `SpareColumnLogitsProcessor`. Their prompt ids must
    already be clamped to `vocab_size` (the n-gram ban reads them when it is created)."""
    return LogitsProcessorList(
        SpareColumnLogitsProcessor(processor, vocab_size)
        if isinstance(processor, PROMPT_READING_PROCESSORS)
        else processor
        for processor in processors
    )
