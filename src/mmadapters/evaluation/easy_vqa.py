"""easy-vqa accuracy, overall and by question type (yes/no, color, shape)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .generate import generate_answers
from .scoring import LETTERS_HINT, accuracy_by_group, extract_described_answer, extract_letter, extract_word


def evaluate_easy_vqa(
    model: Any,
    processor: Any,
    dataset: Any,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
    answers_described: bool | None = None,
) -> dict:
    """Generate an answer for every row of a `load_easy_vqa` data set and score it.

    The row's target tells its format: open, the first answer word in the row's choices; multiple choice, the
    option letter; describe (" blue circle. no"), the answer word after the description. `answers_described=True`
    scores every row the describe way (a model trained on describe targets, asked open-format test questions:
    the prompts are the same); False scores none so.
    Returns accuracy, by_group (question type), count, unparsed and the raw `generations`.
    """
    if answers_described is None:
        described = ["." in target for target in dataset["target"]]
    else:
        described = [answers_described] * len(dataset)
    generations = generate_answers(
        model,
        processor,
        dataset["prompt"],
        dataset["image"],
        batch_size=batch_size,
        max_new_tokens=8 if any(described) else 4,  # " blue rectangle. yes" + end is 6 tokens
        progress=progress,
    )
    predictions = []
    for text, choices, target, describe in zip(
        generations, dataset["choices"], dataset["target"], described, strict=True
    ):
        if describe:
            predictions.append(extract_described_answer(text, choices))
        elif target.strip() in LETTERS_HINT and len(target.strip()) == 1:
            letter = extract_letter(text, len(choices))
            predictions.append(None if letter is None else choices[LETTERS_HINT.index(letter)])
        else:
            predictions.append(extract_word(text, choices))
    result = accuracy_by_group(predictions, dataset["answer"], dataset["question_type"])
    result["generations"] = generations
    return result
