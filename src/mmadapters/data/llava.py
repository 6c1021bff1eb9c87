"""LLaVA-style conversation JSON: `[{"image": "file.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}, ...]}, ...]`, or the same records one per line (JSON Lines, `.jsonl`).

Every assistant turn becomes one training example whose prompt is the conversation so far, rendered with the
processor's chat template (the image goes into the first user turn), and whose target is that turn.

A malformed record is refused with its number and what is wrong, before any training: LaVIN and CROME take at
most one image per sample, so a record names one image (a string, or a list of one) and its text holds at most
one `<image>` placeholder, and none without an image.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .rows import first_rows

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_PLACEHOLDER = "<image>"


def load_llava_conversations(
    json_path: str, image_folder: str | None, processor: Any, limit: int | None = None
) -> Any:
    """A `datasets.Dataset` with image (path or None), prompt and target columns; `limit`: its first examples (every
    record is still checked)."""
    import datasets

    records = read_records(json_path)
    rows = {"image": [], "prompt": [], "target": []}
    for number, record in enumerate(records):
        where = f"{json_path}, conversation {number}"
        image = _image_path(record, image_folder or os.path.dirname(json_path), where)
        turns = _turns(record, where)
        placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
        if placeholders > 1 or (placeholders and image is None):
            raise ValueError(
                f"{where}: its text holds {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for "
                f"{0 if image is None else 1} image; LaVIN and CROME take at most one image per sample, with at "
                "most one placeholder (it may be left out: the image goes into the first user turn)."
            )
        messages: list[dict[str, Any]] = []
        for role, text in turns:
            text = text.replace(f"{IMAGE_PLACEHOLDER}\n", "").replace(f"\n{IMAGE_PLACEHOLDER}", "")
            text = text.replace(IMAGE_PLACEHOLDER, "").strip()
            if role == "assistant":
                if not any(m["role"] == "user" for m in messages):
                    raise ValueError(f"{where}: an assistant turn comes before any user turn.")
                rows["image"].append(image)
                rows["prompt"].append(processor.apply_chat_template(messages, add_generation_prompt=True))
                rows["target"].append(text)
            content = [{"type": "text", "text": text}]
            if role == "user" and image is not None and not any(m["role"] == "user" for m in messages):
                content.insert(0, {"type": "image"})
            messages.append({"role": role, "content": content})
    if not rows["target"]:
        raise ValueError(f"{json_path} holds no assistant turn ('from': 'gpt'): nothing to train on.")
    return first_rows(datasets.Dataset.from_dict(rows), limit)


def read_records(json_path: str) -> list[Any]:
    """The records of a JSON file holding a list, or of a JSON Lines file (one record per line)."""
    with open(json_path, encoding="utf-8") as f:
        text = f.read()
    try:
        records = json.loads(text)
    except json.JSONDecodeError as whole_file_error:
        records = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(
                    f"{json_path} is neither JSON ({whole_file_error}) nor JSON Lines (line {line_number} is not "
                    "a JSON record)."
                ) from None
    if not isinstance(records, list):
        raise ValueError(f"{json_path} must hold a list of conversations (or one conversation per line).")
    return records


def _image_path(record: Any, image_folder: str, where: str) -> str | None:
    if not isinstance(record, dict):
        raise ValueError(f"{where} is a {type(record).__name__}, not a record with 'conversations'.")
    image = record.get("image")
    if isinstance(image, list):
        if len(image) > 1:
            raise ValueError(
                f"{where} names {len(image)} images; LaVIN and CROME take at most one image per sample."
            )
        image = image[0] if image else None
    if image is None:
        return None
    if not isinstance(image, str):
        raise ValueError(f"{where}: 'image' must be a file name, not {type(image).__name__}.")
    path = os.path.join(image_folder, image)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: image {path} does not exist.")
    return path


def _turns(record: dict[str, Any], where: str) -> list[tuple[str, str]]:
    """(role, text) of each turn, checked."""
    conversation = record.get("conversations")
    if not isinstance(conversation, list):
        raise ValueError(f"{where} has no list of turns under 'conversations'.")
    turns = []
    for index, turn in enumerate(conversation):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(
                f"{where}, turn {index}: a turn is {{'from': ..., 'value': <text>}}; got {turn!r:.200}."
            )
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise ValueError(f"{where}, turn {index}: unknown speaker {turn.get('from')!r}.")
        turns.append((role, turn["value"]))
    return turns
