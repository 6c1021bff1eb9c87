"""`mmadapters eval --task scienceqa|mme|mmbench`: load the benchmark (from the Hub, or a local copy in the Hub
layout for offline machines), prompt the model, extract the answers and score them with the paper's tables.

Prompts: ScienceQA in the QCM-ALE format LaVIN is trained on (`mmadapters.data.scienceqa`); MME and MMBench as one
user turn through the processor's chat template (for a converted official checkpoint: the official
"Image: <image> Instruction: ...\\nResponse: " layout, as the official MME evaluation prompts).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

from ..data.parquet_copy import read_parquet_copy
from ..data.rows import first_rows
from ..data.scienceqa import LETTERS, is_official_scienceqa_folder, read_official_scienceqa, scienceqa_example
from .benchmarks import mmbench_circular, mme_scores, mme_yes_no, rotate_options
from .generate import generate_answers
from .scoring import extract_letter, scienceqa_table

# Where each benchmark lives on the Hub: (repo id, config, default split).
HUB_SOURCES = {
    "scienceqa": ("derek-thomas/ScienceQA", None, "test"),
    "mme": ("lmms-lab/MME", None, "test"),
    "mmbench": ("lmms-lab/MMBench", "en", "dev"),
}
MMBENCH_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def load_task_data(
    task: str, data: str | None = None, split: str | None = None, limit: int | None = None
) -> Any:
    """The benchmark's rows: from `data` (a Hub id, a folder of parquet files in the Hub layout such as
    `data/test-00000-of-00001.parquet`, or one parquet file; for ScienceQA also its official layout, the folder
    with problems.json, pid_splits.json and images/), by default the benchmark's Hub repo."""
    import datasets

    repo, config, default_split = HUB_SOURCES[task]
    split = split or default_split
    source = data or repo
    if task == "scienceqa" and is_official_scienceqa_folder(source):
        rows = read_official_scienceqa(source, split)
    elif os.path.isfile(source) or os.path.isdir(source):
        rows = read_parquet_copy(source, split)
    else:
        rows = datasets.load_dataset(source, config, split=split)
    return first_rows(rows, limit)


def chat_prompt(processor: Any, text: str, has_image: bool) -> str:
    """One user turn (the image first) through the processor's chat template, ready for generation."""
    content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def evaluate_scienceqa(
    model: Any, processor: Any, rows: Any, batch_size: int, progress: Callable | None
) -> dict:
    """The ScienceQA table (NAT, SOC, LAN, TXT, IMG, NO, G1-6, G7-12, Avg), answers as "The answer is X."."""
    examples = [scienceqa_example(row) for row in rows]
    generations = generate_answers(
        model,
        processor,
        [e["prompt"] for e in examples],
        [row["image"] for row in rows],
        batch_size=batch_size,
        max_new_tokens=16,
        progress=progress,
    )
    records = [
        {
            "prediction": extract_letter(text, example["num_choices"]),
            "answer": example["answer_letter"],
            "subject": row["subject"],
            "hint": row.get("hint") or "",
            "has_image": example["has_image"],
            "grade": row["grade"],
        }
        for text, example, row in zip(generations, examples, rows, strict=True)
    ]
    table = scienceqa_table(records)
    metrics = {
        name: value
        for name, value in table.items()
        if name not in ("count", "unparsed") and value is not None
    }
    return {
        "metrics": metrics,
        "count": table["count"],
        "unparsed": table["unparsed"],
        "generations": generations,
    }


def evaluate_mme(model: Any, processor: Any, rows: Any, batch_size: int, progress: Callable | None) -> dict:
    """MME perception and cognition scores (acc + acc+ per subtask)."""
    prompts = [chat_prompt(processor, row["question"], True) for row in rows]
    generations = generate_answers(
        model, processor, prompts, [row["image"] for row in rows], batch_size=batch_size, max_new_tokens=4,
        progress=progress,
    )  # fmt: skip
    records = [
        {
            "category": row["category"],
            "image_id": row.get("question_id") or row.get("image_id"),
            "prediction": mme_yes_no(text),
            "answer": row["answer"],
        }
        for text, row in zip(generations, rows, strict=True)
    ]
    scores = mme_scores(records)
    metrics = {"perception": scores["perception"], "cognition": scores["cognition"]}
    metrics.update({f"{name} score": s["score"] for name, s in scores["subtasks"].items()})
    return {"metrics": metrics, "subtasks": scores["subtasks"], "count": scores["count"],
            "unparsed": scores["unparsed"], "generations": generations}  # fmt: skip


def mmbench_rotations(row: dict) -> list[dict]:
    """The circular-evaluation rotations of one MMBench row: prompt text, options and the answer's index."""
    options = [row[letter] for letter in "ABCDEFGH" if _present(row.get(letter))]
    answer = "ABCDEFGH".index(row["answer"].strip())
    hint = row.get("hint")
    rotations = []
    for shift in range(len(options)):
        rotated, moved = rotate_options(options, answer, shift)
        lines = [hint] if _present(hint) else []
        lines.append(row["question"])
        lines += [f"{LETTERS[i]}. {option}" for i, option in enumerate(rotated)]
        lines.append(MMBENCH_INSTRUCTION)
        rotations.append({"text": "\n".join(lines), "num_options": len(rotated), "answer": moved})
    return rotations


def _present(value: Any) -> bool:
    return (
        value is not None
        and not (isinstance(value, float) and math.isnan(value))
        and str(value).strip() != ""
    )


def evaluate_mmbench(
    model: Any, processor: Any, rows: Any, batch_size: int, progress: Callable | None
) -> dict:
    """MMBench circular accuracy, overall and by category."""
    items = []
    for row in rows:
        for rotation in mmbench_rotations(row):
            items.append((row, rotation))
    generations = generate_answers(
        model,
        processor,
        [chat_prompt(processor, rotation["text"], row.get("image") is not None) for row, rotation in items],
        [row.get("image") for row, _ in items],
        batch_size=batch_size,
        max_new_tokens=4,
        progress=progress,
    )
    records = []
    for text, (row, rotation) in zip(generations, items, strict=True):
        letter = extract_letter(text, rotation["num_options"])
        records.append(
            {
                "question_id": str(row["index"]),
                "category": row.get("category") or "all",
                "prediction": None if letter is None else LETTERS.index(letter),
                "answer": rotation["answer"],
            }
        )
    scores = mmbench_circular(records)
    metrics = {"circular accuracy": scores["accuracy"]}
    metrics.update({f"circular accuracy ({c})": v for c, v in scores["by_category"].items()})
    return {
        "metrics": metrics,
        "count": scores["count"],
        "unparsed": scores["unparsed"],
        "generations": generations,
    }


TASKS = {"scienceqa": evaluate_scienceqa, "mme": evaluate_mme, "mmbench": evaluate_mmbench}


def run_task(
    task: str,
    model: Any,
    processor: Any,
    data: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Load and score one benchmark; returns {"task", "dataset", "split", "metrics", "count", "unparsed", ...}."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; the tasks are {sorted(TASKS)} and easy-vqa.")
    rows = load_task_data(task, data, split, limit)
    result = TASKS[task](model, processor, rows, batch_size, progress)
    return {
        "task": task,
        "dataset": data or HUB_SOURCES[task][0],
        "split": split or HUB_SOURCES[task][2],
        **result,
    }


__all__ = ["HUB_SOURCES", "TASKS", "load_task_data", "mmbench_rotations", "run_task"]
