"""Push adapter-only checkpoints to the Hugging Face Hub (`mmadapters push`, `model.push_to_hub`).

What is uploaded: the checkpoint folder as it is, plus a generated model card (README.md) unless the folder has
its own. Backbone weights (a full `save_pretrained(adapter_only=False)` folder) are refused unless asked for
explicitly: the point of an adapter repo is megabytes, not gigabytes.

Loading a pushed repo through transformers' Auto classes: they take any repo with an `adapter_config.json` for a
PEFT adapter and, for Hub ids, load `base_model_name_or_path` from it instead of the repo itself. The uploaded
`adapter_config.json` therefore names the repo itself there (our backbones are named in `config.json`), so
`AutoModelForImageTextToText.from_pretrained(repo_id)` reaches our `from_pretrained`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .model_card import build_model_card

# Files that hold backbone weights: present only in full (not adapter-only) saves.
BACKBONE_WEIGHT_PATTERNS = (
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "*.gguf",
)
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)


class PushError(RuntimeError):
    """The push could not be done; the message says why and what to do."""


@dataclass
class PlannedFile:
    path: str  # path in the repo
    size: int


def backbone_weight_files(folder: str) -> list[str]:
    return sorted(
        name for name in os.listdir(folder) if any(fnmatch.fnmatch(name, p) for p in BACKBONE_WEIGHT_PATTERNS)
    )


def plan_upload(folder: str, include_backbone_weights: bool = False) -> list[PlannedFile]:
    """The files a push would upload (README.md included), checked: an adapter-only folder unless told."""
    if not os.path.isdir(folder):
        raise PushError(
            f"{folder} is not a folder. Save a checkpoint with `model.save_pretrained(folder)` first."
        )
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise PushError(f"{folder} has no config.json: it is not an mmadapters checkpoint folder.")
    heavy = backbone_weight_files(folder)
    if heavy and not include_backbone_weights:
        raise PushError(
            f"{folder} holds backbone weights ({', '.join(heavy)}): it is a full checkpoint. Push an adapter-only "
            "folder (`save_pretrained(folder)`, the default), or pass --include-backbone-weights "
            "(`include_backbone_weights=True`) if you really mean to upload them."
        )
    planned = []
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            full = os.path.join(root, name)
            relative = os.path.relpath(full, folder).replace(os.sep, "/")
            if relative.startswith((".git/", ".cache/")):
                continue
            planned.append(PlannedFile(relative, os.path.getsize(full)))
    if not any(f.path == "README.md" for f in planned):
        planned.append(PlannedFile("README.md", len(str(build_model_card(folder, "owner/name")).encode())))
    return sorted(planned, key=lambda f: f.path)


def _stage(folder: str, repo_id: str, staging: str) -> None:
    """Copy the folder, add the model card, and point adapter_config.json's base model at the repo itself."""
    shutil.copytree(folder, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git", ".cache"))
    readme = os.path.join(staging, "README.md")
    if not os.path.isfile(readme):
        build_model_card(folder, repo_id).save(readme)
    adapter_config = os.path.join(staging, "adapter_config.json")
    if os.path.isfile(adapter_config):
        with open(adapter_config) as f:
            values = json.load(f)
        values["base_model_name_or_path"] = repo_id
        with open(adapter_config, "w") as f:
            json.dump(values, f, indent=2, sort_keys=True)
            f.write("\n")


def _with_retries(
    action: Callable[[], Any], what: str, endpoint: str, token: str | None, retries: int, wait: float
) -> Any:
    """Run `action`, retrying transient failures (HTTP 408/429/5xx, connection errors) with backoff."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    for attempt in range(retries + 1):
        try:
            return action()
        except HfHubHTTPError as error:
            status = error.response.status_code if error.response is not None else None
            if status in (401, 403):
                raise PushError(
                    f"The Hub at {endpoint} refused the credentials while trying to {what} (HTTP {status}). Log in "
                    "with `hf auth login` or set HF_TOKEN to a token with write access to this namespace."
                ) from None
            if status not in TRANSIENT_STATUS or attempt == retries:
                raise PushError(_scrub(f"Could not {what} on {endpoint}: {error}", token)) from None
        except (httpx2.TransportError, ConnectionError) as error:
            if attempt == retries:
                raise PushError(
                    f"Could not reach the Hub at {endpoint} to {what} after {retries + 1} attempts "
                    f"({type(error).__name__}). Check the network, or HF_ENDPOINT if you use a mirror."
                ) from None
        time.sleep(wait * 2**attempt)


def _scrub(message: str, token: str | None) -> str:
    return message.replace(token, "***") if token else message


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    include_backbone_weights: bool = False,
    dry_run: bool = False,
    retries: int = 4,
    retry_wait: float = 1.0,
    endpoint: str | None = None,
) -> list[PlannedFile] | str:
    """Upload an adapter-only checkpoint folder to `repo_id` (created if needed; an existing repo gets a new
    commit). Returns the commit URL, or with `dry_run=True` the planned files without contacting the Hub."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token

    folder = os.fspath(folder)
    planned = plan_upload(folder, include_backbone_weights)
    if dry_run:
        return planned
    endpoint = endpoint or constants.ENDPOINT
    api = HfApi(endpoint=endpoint, token=token)
    token = token or get_token()  # only to scrub it from messages: never printed
    with tempfile.TemporaryDirectory() as staging:
        _stage(folder, repo_id, staging)
        _with_retries(
            lambda: api.create_repo(repo_id, private=private, exist_ok=True),
            "create the repo",
            endpoint,
            token,
            retries,
            retry_wait,
        )
        operations = [
            CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=os.path.join(staging, f.path))
            for f in planned
        ]

        def commit() -> Any:
            # Fresh operations each attempt: the client refuses to reuse committed ones.
            ops = [
                CommitOperationAdd(path_in_repo=o.path_in_repo, path_or_fileobj=o.path_or_fileobj)
                for o in operations
            ]
            return api.create_commit(
                repo_id, operations=ops, commit_message=commit_message or "Upload adapters with mmadapters"
            )

        info = _with_retries(commit, "upload the files", endpoint, token, retries, retry_wait)
    return info.commit_url


def format_plan(planned: list[PlannedFile]) -> str:
    width = max(len(f.path) for f in planned)
    lines = [f"{f.path:<{width}}  {f.size / 1e6:10.3f} MB" for f in planned]
    lines.append(f"{'total':<{width}}  {sum(f.size for f in planned) / 1e6:10.3f} MB")
    return "\n".join(lines)
