"""Scorers of the benchmarks everyone reports: MME (perception and cognition, with acc+) and MMBench (circular
evaluation). Pure functions of predictions, tested on hand-made fixtures; `mmadapters.evaluation.tasks` runs them.

MME (Fu et al., 2023): every image has two yes/no questions. Per subtask, acc = correct questions / questions and
acc+ = images with both questions right / images; the subtask's score is 100 x (acc + acc+) (at most 200). The
perception score sums the 10 perception subtasks (at most 2000), the cognition score the 4 cognition ones (800).

MMBench (Liu et al., 2023), circular evaluation: a question with N options is asked N times, the options rotated by
one each time; it counts as correct only if every rotation is answered correctly.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

MME_PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_yes_no(text: str) -> str | None:
    """ "yes" / "no" from a generated answer (its first word that is one of them), else None."""
    for word in text.lower().replace(",", " ").replace(".", " ").split():
        if word in ("yes", "no"):
            return word
    return None


def mme_scores(records: Sequence[dict]) -> dict:
    """MME scores. Each record: `category` (subtask), `image_id` (the image both questions are about),
    `prediction` ("yes" / "no" / None) and `answer` ("Yes" / "No"). Returns per-subtask acc, acc+ and score,
    the perception and cognition totals, the question count and the unparsed answers."""
    questions: dict[str, list[bool]] = defaultdict(list)
    images: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        correct = (
            record["prediction"] is not None and record["prediction"] == record["answer"].strip().lower()
        )
        questions[record["category"]].append(correct)
        images[record["category"]][record["image_id"]].append(correct)
    subtasks = {}
    for category, answers in sorted(questions.items()):
        acc = sum(answers) / len(answers)
        per_image = images[category].values()
        acc_plus = sum(all(image) for image in per_image) / len(per_image)
        subtasks[category] = {
            "acc": round(100 * acc, 2),
            "acc+": round(100 * acc_plus, 2),
            "score": round(100 * (acc + acc_plus), 2),
        }
    unknown = sorted(set(subtasks) - set(MME_PERCEPTION) - set(MME_COGNITION))
    if unknown:
        raise ValueError(f"Unknown MME subtask(s) {unknown}; MME's are {MME_PERCEPTION + MME_COGNITION}.")
    return {
        "perception": round(sum(s["score"] for c, s in subtasks.items() if c in MME_PERCEPTION), 2),
        "cognition": round(sum(s["score"] for c, s in subtasks.items() if c in MME_COGNITION), 2),
        "subtasks": subtasks,
        "count": len(records),
        "unparsed": sum(record["prediction"] is None for record in records),
    }


def rotate_options(options: Sequence[str], answer: int, shift: int) -> tuple[list[str], int]:
    """The options rotated left by `shift` (option `shift` comes first) and where the answer moved to."""
    count = len(options)
    rotated = [options[(i + shift) % count] for i in range(count)]
    return rotated, (answer - shift) % count


def mmbench_circular(records: Sequence[dict]) -> dict:
    """MMBench circular accuracy. Each record is one rotation: `question_id`, `category`, `prediction` (option
    index or None) and `answer` (option index in that rotation). A question counts as correct when all its
    rotations are. Returns accuracy (%), by_category, the question count and the unparsed rotations."""
    rotations: dict[str, list[bool]] = defaultdict(list)
    category_of: dict[str, str] = {}
    for record in records:
        rotations[record["question_id"]].append(record["prediction"] == record["answer"])
        category_of[record["question_id"]] = record["category"]
    passed = {question: all(results) for question, results in rotations.items()}
    by_category: dict[str, list[bool]] = defaultdict(list)
    for question, ok in passed.items():
        by_category[category_of[question]].append(ok)
    return {
        "accuracy": round(100 * sum(passed.values()) / len(passed), 2) if passed else 0.0,
        "by_category": {c: round(100 * sum(v) / len(v), 2) for c, v in sorted(by_category.items())},
        "count": len(passed),
        "unparsed": sum(record["prediction"] is None for record in records),
    }


__all__ = [
    "MME_COGNITION",
    "MME_PERCEPTION",
    "mmbench_circular",
    "mme_scores",
    "mme_yes_no",
    "rotate_options",
]
