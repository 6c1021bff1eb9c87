"""LLaVA-style conversation JSON: `[{"image": "file.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}, ...]}, ...]`.

Every assistant turn becomes one training example whose prompt is the conversation so far, rendered with the
processor's chat template (the image goes into the first user turn), and whose target is that turn.
"""

from __future__ import annotations

import json
import os
from typing import Any

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def load_llava_conversations(json_path: str, image_folder: str | None, processor: Any) -> Any:
    """A `datasets.Dataset` with image (path or None), prompt and target columns."""
    import datasets

    with open(json_path) as f:
        records = json.load(f)
    if not isinstance(records, list):
        raise ValueError(f"{json_path} must hold a list of conversations.")
    rows = {"image": [], "prompt": [], "target": []}
    for number, record in enumerate(records):
        image = record.get("image")
        if image is not None:
            image = os.path.join(image_folder or os.path.dirname(json_path), image)
            if not os.path.isfile(image):
                raise FileNotFoundError(f"Conversation {number}: image {image} does not exist.")
        messages: list[dict[str, Any]] = []
        for turn in record.get("conversations", []):
            role = ROLES.get(turn.get("from"))
            if role is None:
                raise ValueError(f"Conversation {number}: unknown speaker {turn.get('from')!r}.")
            text = (
                turn["value"].replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "").strip()
            )
            if role == "assistant":
                rows["image"].append(image)
                rows["prompt"].append(processor.apply_chat_template(messages, add_generation_prompt=True))
                rows["target"].append(text)
            content = [{"type": "text", "text": text}]
            if role == "user" and image is not None and not any(m["role"] == "user" for m in messages):
                content.insert(0, {"type": "image"})
            messages.append({"role": role, "content": content})
    return datasets.Dataset.from_dict(rows)
