"""Answer extraction and scorers. Unparseable answers are counted, never guessed (the official LaVIN code picks a
random option there; we report how many there were instead)."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

LETTERS_HINT = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ANSWER_IS = re.compile(r"The answer is \(?([A-Z])\)?\.?")
_LETTER = re.compile(r"^\s*\(?([A-Z])\)?(?:[.):,\s]|$)")
_WORD = re.compile(r"[a-z]+(?:/[a-z]+)?")


def extract_word(text: str, vocabulary: Sequence[str] | None = None) -> str | None:
    """The first word of a generated answer, lower-cased; with a vocabulary, the first word that belongs to it."""
    words = _WORD.findall(text.lower())
    if vocabulary is None:
        return words[0] if words else None
    allowed = set(vocabulary)
    return next((word for word in words if word in allowed), None)


def extract_described_answer(text: str, vocabulary: Sequence[str]) -> str | None:
    """The answer of a description-first generation (" blue circle. no"): the first vocabulary word after the
    description's full stop; None without one (a description alone must not count as the answer)."""
    _, stop, answer = text.partition(".")
    return extract_word(answer, vocabulary) if stop else None


def extract_letter(text: str, num_choices: int) -> str | None:
    """An option letter: "The answer is B." (ScienceQA QCM-ALE), or a bare "B" / "(B)" at the start."""
    match = _ANSWER_IS.search(text) or _LETTER.match(text)
    if match and match.group(1) in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:num_choices]:
        return match.group(1)
    return None


def accuracy_by_group(
    predictions: Sequence[str | None], references: Sequence[str], groups: Sequence[str]
) -> dict:
    """Accuracy overall and per group, with the count of unparsed (None) predictions."""
    if not len(predictions) == len(references) == len(groups):
        raise ValueError("predictions, references and groups must have the same length.")
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for prediction, reference, group in zip(predictions, references, groups, strict=True):
        total[group] += 1
        correct[group] += prediction == reference
    n = len(predictions)
    return {
        "accuracy": sum(correct.values()) / n if n else 0.0,
        "by_group": {group: correct[group] / total[group] for group in sorted(total)},
        "count": n,
        "unparsed": sum(prediction is None for prediction in predictions),
    }


# ScienceQA categories (LAVIN.md section 6 / the ScienceQA paper): subject, context modality, grade.
SCIENCEQA_COLUMNS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")
_SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}


def scienceqa_categories(subject: str, hint: str, has_image: bool, grade: str) -> list[str]:
    """The table columns a ScienceQA question counts in (besides Avg)."""
    columns = [_SUBJECTS[subject]]
    if hint.strip():
        columns.append("TXT")
    if has_image:
        columns.append("IMG")
    if not hint.strip() and not has_image:
        columns.append("NO")
    grade_number = int(re.sub(r"\D", "", grade) or 0)
    columns.append("G1-6" if grade_number <= 6 else "G7-12")
    return columns


def scienceqa_table(records: Sequence[dict]) -> dict:
    """Accuracy (%) per ScienceQA column. Each record: prediction (letter or None), answer (letter), subject,
    hint, has_image, grade. Returns {column: accuracy, ..., "count": n, "unparsed": k}."""
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for record in records:
        ok = record["prediction"] == record["answer"]
        for column in [
            *scienceqa_categories(record["subject"], record["hint"], record["has_image"], record["grade"]),
            "Avg",
        ]:
            total[column] += 1
            correct[column] += ok
    table = {
        column: round(100 * correct[column] / total[column], 2) if total[column] else None
        for column in SCIENCEQA_COLUMNS
    }
    table["count"] = len(records)
    table["unparsed"] = sum(record["prediction"] is None for record in records)
    return table
