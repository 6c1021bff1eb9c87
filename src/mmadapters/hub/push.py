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
# Written into a pushed Space: the model repo its app serves (read by `mmadapters.demo`).
SPACE_SETTINGS_NAME = "mmadapters_space.json"


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
    folder = os.fspath(folder)
    planned = plan_upload(folder, include_backbone_weights)
    if dry_run:
        return planned
    with tempfile.TemporaryDirectory() as staging:
        _stage(folder, repo_id, staging)
        return _upload(
            staging,
            repo_id,
            planned,
            {"private": private},
            commit_message or "Upload adapters with mmadapters",
            token,
            retries,
            retry_wait,
            endpoint,
        )


def plan_space_upload(folder: str) -> list[PlannedFile]:
    """The files of a Space folder, checked: app.py, requirements.txt and a README.md with `sdk: gradio`."""
    if not os.path.isdir(folder):
        raise PushError(f"{folder} is not a folder (expected a Space folder such as spaces/lavin).")
    missing = [
        name
        for name in ("app.py", "requirements.txt", "README.md")
        if not os.path.isfile(os.path.join(folder, name))
    ]
    if missing:
        raise PushError(f"{folder} is not a Space folder: it lacks {', '.join(missing)}.")
    with open(os.path.join(folder, "README.md")) as f:
        if "sdk: gradio" not in f.read():
            raise PushError(f"{folder}/README.md has no `sdk: gradio` front matter.")
    planned = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in ("__pycache__", ".git", "flagged", ".gradio")]
        for name in sorted(files):
            full = os.path.join(root, name)
            planned.append(
                PlannedFile(os.path.relpath(full, folder).replace(os.sep, "/"), os.path.getsize(full))
            )
    heavy = [
        f.path
        for f in planned
        if any(fnmatch.fnmatch(os.path.basename(f.path), p) for p in BACKBONE_WEIGHT_PATTERNS)
    ]
    if heavy:
        raise PushError(
            f"The Space folder holds model weights ({', '.join(heavy)}): a Space loads its model from a model repo."
        )
    if not any(f.path == SPACE_SETTINGS_NAME for f in planned):
        planned.append(PlannedFile(SPACE_SETTINGS_NAME, 0))  # written when the Space is staged
    return sorted(planned, key=lambda f: f.path)


def push_space(
    folder: str | os.PathLike,
    repo_id: str,
    model: str,
    private: bool | None = None,
    token: str | None = None,
    dry_run: bool = False,
    retries: int = 4,
    retry_wait: float = 1.0,
    endpoint: str | None = None,
) -> list[PlannedFile] | str:
    """Upload a Space folder (spaces/lavin, spaces/crome) as a gradio Space serving `model` (a model repo id):
    the model is recorded in `mmadapters_space.json` (read by the app) and in the README's `models:` list."""
    from huggingface_hub import RepoCard

    folder = os.fspath(folder)
    planned = plan_space_upload(folder)
    if dry_run:
        return planned
    with tempfile.TemporaryDirectory() as staging:
        shutil.copytree(
            folder,
            staging,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("__pycache__", ".git", ".gradio", "flagged"),
        )
        with open(os.path.join(staging, SPACE_SETTINGS_NAME), "w") as f:
            json.dump({"model": model}, f, indent=2)
            f.write("\n")
        card = RepoCard.load(os.path.join(staging, "README.md"), repo_type="space")
        card.data.models = [model]
        card.save(os.path.join(staging, "README.md"))
        return _upload(
            staging,
            repo_id,
            plan_space_upload(staging),
            {"private": private, "repo_type": "space", "space_sdk": "gradio"},
            f"Upload the Space (model {model}) with mmadapters",
            token,
            retries,
            retry_wait,
            endpoint,
        )


def _upload(
    staging: str,
    repo_id: str,
    planned: list[PlannedFile],
    create_kwargs: dict[str, Any],
    commit_message: str,
    token: str | None,
    retries: int,
    retry_wait: float,
    endpoint: str | None,
) -> str:
    """Create the repo (or keep the existing one) and commit the staged files, retrying transient failures."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token

    endpoint = endpoint or constants.ENDPOINT
    api = HfApi(endpoint=endpoint, token=token)
    token = token or get_token()  # only to scrub it from messages: never printed
    repo_type = create_kwargs.get("repo_type")
    _with_retries(
        lambda: api.create_repo(repo_id, exist_ok=True, **create_kwargs),
        "create the repo",
        endpoint,
        token,
        retries,
        retry_wait,
    )

    def commit() -> Any:
        # Fresh operations on each attempt: the client refuses to reuse committed ones.
        operations = [
            CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=os.path.join(staging, f.path))
            for f in planned
        ]
        return api.create_commit(
            repo_id, operations=operations, commit_message=commit_message, repo_type=repo_type
        )

    return _with_retries(commit, "upload the files", endpoint, token, retries, retry_wait).commit_url


def format_plan(planned: list[PlannedFile]) -> str:
    width = max(len(f.path) for f in planned)
    lines = [f"{f.path:<{width}}  {f.size / 1e6:10.3f} MB" for f in planned]
    lines.append(f"{'total':<{width}}  {sum(f.size for f in planned) / 1e6:10.3f} MB")
    return "\n".join(lines)
