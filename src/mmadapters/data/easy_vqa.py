"""easy-vqa (PyPI `easy-vqa`, MIT): 64x64 images of one colored shape, with questions about shape and color.

4,000 train / 1,000 test images, 38,575 / 9,673 questions, 13 answers. Rows: `image` (path), `question`,
`answer` (the word), `question_type` ("yes/no", "color" or "shape"), `choices`, and the model-ready `prompt`
and `target` for the chosen prompt format.

Prompt formats: "open" (answered with the word), "multiple_choice" (lettered options, answered with the
letter) and "describe" (our addition): the target first says what the image shows, then answers,
" blue circle. no". Written-out colour and shape are what teach a LaVIN model the yes/no questions, three
quarters of easy-vqa (benchmarks/README.md, "Teaching the yes/no questions"). The data set has no image
annotations, so each image's colour and shape are read off its own questions (`image_descriptions`); the
images whose questions do not reveal both (about 12% of the images, 9% of the questions) are left out of this
format.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from typing import Literal

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
YES_NO = ("yes", "no")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
PROMPT_FORMATS = ("open", "multiple_choice", "describe")


def question_type(answer: str) -> str:
    if answer in YES_NO:
        return "yes/no"
    return "shape" if answer in SHAPES else "color"


def format_prompt(question: str, prompt_format: str, choices: list[str], image: bool = True) -> str:
    """The prompt of one question. "open" and "describe": LaVIN's plain layout; "multiple_choice": the options
    are listed with letters."""
    head = "Image: <image>\n" if image else "Image: N/A\n"
    if prompt_format in ("open", "describe"):
        return f"{head}Question: {question}\nAnswer:"
    options = " ".join(f"({LETTERS[i]}) {choice}" for i, choice in enumerate(choices))
    return f"{head}Question: {question}\nOptions: {options}\nAnswer:"


def format_target(answer: str, prompt_format: str, choices: list[str], description: str | None = None) -> str:
    """ " blue" (open), " B" (multiple_choice) or " blue circle. blue" (describe: needs the image's description)."""
    if prompt_format == "describe":
        if description is None:
            raise ValueError('The "describe" format needs the image\'s description ("colour shape").')
        return f" {description}. {answer}"
    return f" {answer}" if prompt_format == "open" else f" {LETTERS[choices.index(answer)]}"


def image_descriptions(questions: list[str], answers: list[str], image_ids: list[int]) -> dict[int, str]:
    """ "colour shape" of every image whose own questions reveal both, keyed by image id.

    An open answer names one attribute and its question may name the other ("what color is the triangle?" ->
    blue: a blue triangle); a yes/no question names an attribute the image has when its answer is "yes" and the
    question is not negated ("not", "no"), or "no" and it is ("is there not a red shape?" -> no: it is red).
    """
    colours, shapes = defaultdict(set), defaultdict(set)
    for question, answer, image in zip(questions, answers, image_ids, strict=True):
        words = re.findall(r"[a-z]+", question.lower())
        negated = "not" in words or "no" in words
        if answer in YES_NO and (answer == "yes") == negated:
            continue  # names an attribute the image does not have
        named = words + ([] if answer in YES_NO else [answer])
        shapes[image] |= {word for word in named if word in SHAPES}
        colours[image] |= {word for word in named if word in COLORS}
    return {
        image: f"{next(iter(colours[image]))} {next(iter(shapes[image]))}"
        for image in colours
        if len(colours[image]) == 1 and len(shapes[image]) == 1
    }


def load_easy_vqa(
    split: Literal["train", "test"] = "train",
    prompt_format: Literal["open", "multiple_choice", "describe"] = "open",
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
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}.")
    questions, answers, image_ids = (
        easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()
    )
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    descriptions = image_descriptions(questions, answers, image_ids) if prompt_format == "describe" else {}
    indices = list(range(len(questions)))
    if prompt_format == "describe":  # only images whose questions reveal their colour and shape
        indices = [i for i in indices if image_ids[i] in descriptions]
    if limit is not None:
        random.Random(seed).shuffle(indices)
        indices = indices[:limit]
    rows = {
        key: [] for key in ("image", "question", "answer", "question_type", "choices", "prompt", "target")
    }
    for i in indices:
        kind = question_type(answers[i])
        choices = list(YES_NO if kind == "yes/no" else SHAPES if kind == "shape" else COLORS)
        rows["image"].append(paths[image_ids[i]])
        rows["question"].append(questions[i])
        rows["answer"].append(answers[i])
        rows["question_type"].append(kind)
        rows["choices"].append(choices)
        rows["prompt"].append(format_prompt(questions[i], prompt_format, choices))
        rows["target"].append(
            format_target(answers[i], prompt_format, choices, descriptions.get(image_ids[i]))
        )
    return datasets.Dataset.from_dict(rows)
