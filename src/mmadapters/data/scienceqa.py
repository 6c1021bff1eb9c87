"""ScienceQA in the official QCM-ALE format (LAVIN.md section 6).

Input: `Question: {q}\nContext: {hint or "N/A"}\nOptions: (A) ... (B) ...\nResponse:`; target:
`The answer is {X}. BECAUSE: {lecture} {solution}`, joined to the input with no space. As in the official
ScienceQA code, newlines inside lecture and solution are written as the two characters "\\n". LaVIN's image
layout comes first, as in the official code: "Image: <image> " for questions with an image, "Image: N/A "
otherwise (a space, no newline: see `LavinProcessor`'s official tokenisation).
"""

from __future__ import annotations

import json
import os
from typing import Any

from .rows import first_rows

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
HUB_DATASET = "derek-thomas/ScienceQA"
# The official layout (the ScienceQA repo's data/scienceqa folder; LaVIN's data/ folder).
OFFICIAL_FILES = ("problems.json", "pid_splits.json")
# The fields of a problem in problems.json, which are also the Hub data set's columns.
PROBLEM_FIELDS = (
    "question", "choices", "answer", "hint", "task", "grade", "subject", "topic", "category", "skill", "lecture",
    "solution",
)  # fmt: skip


def qcm_input(question: str, hint: str, choices: list[str]) -> str:
    options = " ".join(f"({LETTERS[i]}) {choice}" for i, choice in enumerate(choices))
    context = hint.strip() or "N/A"
    return f"Question: {question}\nContext: {context}\nOptions: {options}\nResponse:"


def ale_target(answer: int, lecture: str, solution: str) -> str:
    lecture = lecture.replace("\n", "\\n")
    solution = solution.replace("\n", "\\n")
    text = f"The answer is {LETTERS[answer]}. BECAUSE: {lecture} {solution}"
    return text.replace("  ", " ").strip()


def scienceqa_example(row: dict[str, Any]) -> dict[str, Any]:
    """One raw ScienceQA row (the Hub schema) -> prompt, target and the fields the scorer needs."""
    has_image = row.get("image") is not None
    head = "Image: <image> " if has_image else "Image: N/A "
    return {
        "prompt": head + qcm_input(row["question"], row.get("hint") or "", list(row["choices"])),
        "target": ale_target(int(row["answer"]), row.get("lecture") or "", row.get("solution") or ""),
        "answer_letter": LETTERS[int(row["answer"])],
        "num_choices": len(row["choices"]),
        "has_image": has_image,
    }


def format_scienceqa(dataset: Any) -> Any:
    """Add prompt/target/answer_letter/num_choices/has_image columns to a ScienceQA `datasets.Dataset`."""
    return dataset.map(scienceqa_example)


def load_scienceqa(
    split: str = "train", cache_dir: str | None = None, path: str | None = None, limit: int | None = None
) -> Any:
    """ScienceQA formatted as QCM-ALE: from the Hub (needs network), or from `path`, a local copy in the official
    layout (problems.json, pid_splits.json, images/) or in the Hub's parquet layout. `limit`: the first rows of
    the split."""
    import datasets

    from .parquet_copy import read_parquet_copy

    if path is None:
        rows = datasets.load_dataset(HUB_DATASET, split=split, cache_dir=cache_dir)
    elif is_official_scienceqa_folder(path):
        rows = read_official_scienceqa(path, split)
    else:
        rows = read_parquet_copy(path, split)
    return format_scienceqa(first_rows(rows, limit))


def is_official_scienceqa_folder(path: str) -> bool:
    return os.path.isdir(path) and all(os.path.isfile(os.path.join(path, name)) for name in OFFICIAL_FILES)


def read_official_scienceqa(folder: str, split: str) -> Any:
    """The problems of `split` (a key of pid_splits.json: train, val, test, minival, ...) as a `datasets.Dataset`
    in the Hub's schema, plus `pid`. `image` is the image file's path, images/<the problem's split>/<pid>/<file>
    as the official code reads it (None for a problem without an image); a missing image is refused here, before
    anything runs."""
    import datasets

    problems, splits = (_read_json(folder, name) for name in OFFICIAL_FILES)
    if split not in splits:
        raise ValueError(f"{folder}/pid_splits.json has no split {split!r}; it has {sorted(splits)}.")
    rows, missing = [], []
    for pid in splits[split]:
        if pid not in problems:
            raise ValueError(f"Problem {pid} of split {split!r} in pid_splits.json is not in problems.json.")
        problem = problems[pid]
        image = None
        if problem.get("image"):
            image = os.path.join(folder, "images", problem.get("split", split), pid, problem["image"])
            if not os.path.isfile(image):
                missing.append(image)
        rows.append({"pid": pid, "image": image, **{name: problem.get(name) for name in PROBLEM_FIELDS}})
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) of split {split!r} are missing, e.g. {missing[0]}: the official layout keeps "
            "them under images/<split>/<pid>/ (download them from the ScienceQA repo)."
        )
    return datasets.Dataset.from_list(rows)


def _read_json(folder: str, name: str) -> Any:
    path = os.path.join(folder, name)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from None
