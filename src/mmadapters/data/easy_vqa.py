"""easy-vqa (PyPI `easy-vqa`, MIT): 64x64 images of one colored shape, with questions about shape and color.

4,000 train / 1,000 test images, 38,575 / 9,673 questions, 13 answers. Rows: `image` (path), `question`,
`answer` (the word), `question_type` ("yes/no", "color" or "shape"), `choices`, and the model-ready `prompt`
and `target` for the chosen prompt format.
"""

from __future__ import annotations

import random
from typing import Literal

SHAPES = ("circle", "rectangle", "triangle")
YES_NO = ("yes", "no")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def question_type(answer: str) -> str:
    if answer in YES_NO:
        return "yes/no"
    return "shape" if answer in SHAPES else "color"


def format_prompt(question: str, prompt_format: str, choices: list[str], image: bool = True) -> str:
    """The prompt of one question. "open": LaVIN's plain layout, answered with the word; "multiple_choice":
    the options are listed with letters, answered with the letter."""
    head = "Image: <image>\n" if image else "Image: N/A\n"
    if prompt_format == "open":
        return f"{head}Question: {question}\nAnswer:"
    options = " ".join(f"({LETTERS[i]}) {choice}" for i, choice in enumerate(choices))
    return f"{head}Question: {question}\nOptions: {options}\nAnswer:"


def format_target(answer: str, prompt_format: str, choices: list[str]) -> str:
    return f" {answer}" if prompt_format == "open" else f" {LETTERS[choices.index(answer)]}"


def load_easy_vqa(
    split: Literal["train", "test"] = "train",
    prompt_format: Literal["open", "multiple_choice"] = "open",
    limit: int | None = None,
    seed: int = 0,
):
    """easy-vqa as a `datasets.Dataset` (shuffled with `seed` when `limit` takes a subset)."""
    import datasets

    try:
        import easy_vqa
    except ImportError as error:
        raise ImportError("easy-vqa is not installed: `pip install 'mmadapters[data]'`.") from error
    if split not in ("train", "test"):
        raise ValueError(f"easy-vqa has splits 'train' and 'test', not {split!r}.")
    if prompt_format not in ("open", "multiple_choice"):
        raise ValueError(f"prompt_format must be 'open' or 'multiple_choice', got {prompt_format!r}.")
    questions, answers, image_ids = (
        easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()
    )
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    indices = list(range(len(questions)))
    if limit is not None:
        random.Random(seed).shuffle(indices)
        indices = indices[:limit]
    rows = {
        key: [] for key in ("image", "question", "answer", "question_type", "choices", "prompt", "target")
    }
    for i in indices:
        kind = question_type(answers[i])
        choices = list(YES_NO if kind == "yes/no" else SHAPES if kind == "shape" else _colors(easy_vqa))
        rows["image"].append(paths[image_ids[i]])
        rows["question"].append(questions[i])
        rows["answer"].append(answers[i])
        rows["question_type"].append(kind)
        rows["choices"].append(choices)
        rows["prompt"].append(format_prompt(questions[i], prompt_format, choices))
        rows["target"].append(format_target(answers[i], prompt_format, choices))
    return datasets.Dataset.from_dict(rows)


def _colors(easy_vqa_module) -> list[str]:
    return sorted(a for a in easy_vqa_module.get_answers() if a not in SHAPES and a not in YES_NO)
