"""Pushes made by our Trainers (`TrainingArguments(push_to_hub=True)`, `trainer.push_to_hub()`).

transformers' Trainer uploads its output folder as it is: a fixed list of weight file names (not our adapter file,
so the repo gets a config.json without weights until the end), its own generic model card (replacing ours), and
`training_args.bin` saved again with `hub_token` in it. Ours push through the same checks as `mmadapters push`:
the adapter-only checkpoint at the repo's root with our model card, one commit per save, no Trainer state there,
and nothing that is not part of a checkpoint (logs, metrics, other checkpoint folders are left out). What cannot
be pushed (local backbones, backbones built from configs, no license for the card) is refused when the Trainer is
created, not at the first save hours later.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from .model_card import LicenseError, backbone_license, decide_license
from .push import (
    TRAINER_STATE_FILES,
    PushError,
    _folder_files,
    _matches,
    _upload,
    checkpoint_files,
    local_backbone,
)

# Where hub_strategy "checkpoint" puts the latest whole checkpoint (transformers' name; resumable from there).
LAST_CHECKPOINT_IN_REPO = "last-checkpoint"


def check_trainer_can_push(
    config: dict[str, Any],
    adapter_only: bool,
    license: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
) -> str:
    """Refuse a model whose Trainer checkpoints could not be pushed as an adapter repo; returns the license of the
    model card (`license`, else the backbones' common one, read from their cards)."""
    where = "TrainingArguments(push_to_hub=True) pushes adapter-only checkpoints"
    if not adapter_only:
        raise PushError(
            f"{where}, and this model's backbones were built from config objects (random weights that nobody can "
            "load by name): its checkpoints hold every weight. Build the model from Hub backbones, or train without "
            "push_to_hub and upload with `mmadapters push FOLDER REPO --include-backbone-weights`."
        )
    found = local_backbone(config)
    if found:
        role, name = found
        raise PushError(
            f"{where}, and this model's {role} backbone is a path on this machine ({name}): the repo would load "
            f"nowhere else. Build the model from the backbone's Hub id, or train without push_to_hub and upload a "
            "checkpoint with `mmadapters push FOLDER REPO --allow-local-backbones`."
        )
    names = [(config.get(f"{role}_backbone") or {}).get("name_or_path") for role in ("text", "vision")]
    try:
        return decide_license(
            {name: backbone_license(name, endpoint, token) for name in names if name}, license
        )
    except LicenseError as error:
        raise PushError(f"{error} With a Trainer: `LavinTrainer(..., hub_license='apache-2.0')`.") from None


def push_trainer_folder(
    folder: str | os.PathLike,
    repo_id: str,
    license: str,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    trainer_state_in: str | None = None,
    tags: list[str] | None = None,
    endpoint: str | None = None,
    retries: int = 4,
    retry_wait: float = 1.0,
) -> str:
    """Upload what a Trainer saved in `folder` (a checkpoint-N folder, or the output folder after `save_model`) as
    one commit; returns its URL. The adapter-only checkpoint goes to the repo's root with our model card;
    `trainer_state_in` (hub_strategy "checkpoint" / "all_checkpoints"): the whole checkpoint, Trainer state
    included, also goes into that folder of the repo, to resume from. A training_args.bin that holds the token
    is refused (ours are saved without it)."""
    folder = os.fspath(folder)
    with tempfile.TemporaryDirectory() as generated:
        files = checkpoint_files(
            folder,
            repo_id,
            generated,
            tags=tags,
            license=license,
            endpoint=endpoint,
            token=token,
            leave_out_other_files=True,
        )
        if trainer_state_in:
            state = {
                path: local
                for path, local in _folder_files(folder, (".git", ".cache")).items()
                if "/" not in path and _matches(path, TRAINER_STATE_FILES)
            }
            _refuse_token_in(state, token)
            checkpoint = {path: local for path, local in files.items() if local.startswith(folder + os.sep)}
            for path, local in {**checkpoint, **state}.items():
                files[f"{trainer_state_in}/{path}"] = local
        return _upload(
            files,
            repo_id,
            {},
            commit_message or "Upload adapters with mmadapters",
            token,
            retries,
            retry_wait,
            endpoint,
            {"revision": revision},
        )


def _refuse_token_in(files: dict[str, str], token: str | None) -> None:
    if not token:
        return
    for path, local in files.items():
        with open(local, "rb") as f:
            if token.encode() in f.read():
                raise PushError(f"{path} holds the Hub token: refusing to upload it.")
