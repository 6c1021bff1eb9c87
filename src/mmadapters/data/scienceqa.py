"""ScienceQA in the official QCM-ALE format (LAVIN.md section 6).

Input: `Question: {q}\nContext: {hint or "N/A"}\nOptions: (A) ... (B) ...\nResponse:`; target:
`The answer is {X}. BECAUSE: {lecture} {solution}`, joined to the input with no space. As in the official
ScienceQA code, newlines inside lecture and solution are written as the two characters "\\n". LaVIN's image
layout comes first, as in the official code: "Image: <image> " for questions with an image, "Image: N/A "
otherwise (a space, no newline: see `LavinProcessor`'s official tokenisation).
"""

from __future__ import annotations

from typing import Any

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
HUB_DATASET = "derek-thomas/ScienceQA"


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


def load_scienceqa(split: str = "train", cache_dir: str | None = None) -> Any:
    """ScienceQA from the Hub (needs network), formatted as QCM-ALE."""
    import datasets

    return format_scienceqa(datasets.load_dataset(HUB_DATASET, split=split, cache_dir=cache_dir))
