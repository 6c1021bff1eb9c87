"""Push adapter-only checkpoints to the Hugging Face Hub (`mmadapters push`, `model.push_to_hub`).

What is uploaded: the checkpoint folder's files, plus a generated model card (README.md) unless the folder has its
own. Backbone weights (a full `save_pretrained(adapter_only=False)` folder) are refused unless asked for
explicitly: the point of an adapter repo is megabytes, not gigabytes.

Safety (nothing is pushed that should not be): only regular files inside the folder (a symlink that leaves it is
refused); only the files a checkpoint is made of (`ALLOWED_CHECKPOINT_FILES`; anything else is refused by name);
weights recognised by their content, whatever their name (a safetensors header or a pickle/zip archive in a file
that should be text, backbone tensors in the adapter file); a Trainer checkpoint's state files
(`training_args.bin` may hold a Hub token, optimizer and RNG states are not part of a model) are left out and
listed in the plan; dot-folders (our atomic-save staging folders, .git, .cache) are never read.

Loading a pushed repo through transformers' Auto classes: they take any repo with an `adapter_config.json` for a
PEFT adapter and, for Hub ids, load `base_model_name_or_path` from it instead of the repo itself. Checkpoints of
mmadapters >= 0.2 have no adapter_config.json (see `mmadapters.modeling.checkpoint_files`); in an older one the
uploaded `adapter_config.json` names the repo itself there, so `AutoModelForImageTextToText.from_pretrained(repo_id)`
reaches our `from_pretrained`. A PEFT adapter saved into a checkpoint folder is refused: the repo would load as it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..checkpoint_files import (
    ADAPTER_WEIGHTS_NAME,
    LEGACY_ADAPTER_WEIGHTS_NAME,
    PEFT_CONFIG_NAME,
    is_peft_adapter_folder,
    is_peft_tensor_name,
)
from ..errors import MMAdaptersError
from .model_card import LicenseError, build_model_card
from .remote_code import LOADER_FILE

# Files that hold backbone weights: present only in full (not adapter-only) saves.
BACKBONE_WEIGHT_PATTERNS = (
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "*.gguf",
)
# What a checkpoint folder may hold (model, adapters, processor/tokenizer files, card, evaluation results).
ALLOWED_CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    ADAPTER_WEIGHTS_NAME,
    LOADER_FILE,  # the remote-code loader (see remote_code.py)
    PEFT_CONFIG_NAME,  # legacy (mmadapters 0.1)
    LEGACY_ADAPTER_WEIGHTS_NAME,
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates/*.jinja",  # a processor's named chat templates besides the default (tool_use, ...)
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "qformer_tokenizer/*",
    "README.md",
    "eval_results.json",
    "mmadapters_*.json",
    ".gitattributes",
    *BACKBONE_WEIGHT_PATTERNS,
)
# Files that carry binary weights by design (their content is checked differently).
BINARY_FILES = (
    ADAPTER_WEIGHTS_NAME,
    LEGACY_ADAPTER_WEIGHTS_NAME,
    "tokenizer.model",
    "spiece.model",
    *BACKBONE_WEIGHT_PATTERNS,
)
# A Trainer checkpoint's state: never uploaded (training_args.bin may hold a Hub token).
TRAINER_STATE_FILES = (
    "training_args.bin",
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    "trainer_state.json",
)
# Backbone tensors in an adapter file (PEFT layers on the backbones, e.g. `.lora_A.`, are adapter tensors).
BACKBONE_PREFIXES = ("language_model.", "vision_tower.", "model.", "lm_head.", "vision_model.")
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
# Written into a pushed Space: the model repo its app serves (read by `mmadapters.demo`).
SPACE_SETTINGS_NAME = "mmadapters_space.json"


class PushError(MMAdaptersError, RuntimeError):
    """The push could not be done; the message says why and what to do."""


@dataclass
class PlannedFile:
    path: str  # path in the repo
    size: int


def _folder_files(folder: str, skip_dirs: tuple[str, ...]) -> dict[str, str]:
    """{path in the repo: local path} for every regular file under `folder`, minus the `skip_dirs` folders and
    dot-folders. A symlink whose target lies outside `folder` is refused."""
    root_real = os.path.realpath(folder)
    files = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in skip_dirs and not d.startswith("."))
        for name in sorted(names) + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            full = os.path.join(root, name)
            relative = os.path.relpath(full, folder).replace(os.sep, "/")
            if os.path.islink(full):
                target = os.path.realpath(full)
                if os.path.commonpath([root_real, target]) != root_real:
                    raise PushError(
                        f"{relative} is a symlink to {target}, outside the folder: refusing to upload it. Copy the "
                        "file into the folder if it belongs to the checkpoint."
                    )
                if os.path.isdir(target):
                    raise PushError(f"{relative} is a symlink to a folder: refusing to upload it.")
            if os.path.isfile(full):
                files[relative] = full
    return files


def _matches(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(os.path.basename(path), p) for p in patterns)


def is_checkpoint_file(path: str) -> bool:
    """A file (path in the folder) that a checkpoint or its Trainer state is made of: at the top level, or in the
    Q-Former tokenizer's folder or the named chat templates' folder."""
    top_level = "/" not in path or path.startswith(("qformer_tokenizer/", "additional_chat_templates/"))
    return top_level and _matches(path, ALLOWED_CHECKPOINT_FILES + TRAINER_STATE_FILES)


def looks_like_weights(path: str) -> bool:
    """A file holding tensors, whatever its name: a safetensors header, a zip archive (torch.save) or a pickle."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith((b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"GGUF")):
        return True
    if len(head) >= 9:
        header_length = int.from_bytes(head[:8], "little")
        return 2 <= header_length < 100_000_000 and head[8:9] == b"{"
    return False


def _adapter_file_tensors(path: str) -> list[str]:
    """The tensor names of a safetensors file that are backbone tensors (should be none in an adapter file). A
    tensor of a PEFT layer on a backbone (`....q_proj.lora_A.default.weight`) is an adapter tensor."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        return [
            key for key in handle.keys() if key.startswith(BACKBONE_PREFIXES) and not is_peft_tensor_name(key)
        ]


def check_checkpoint_contents(files: dict[str, str], include_backbone_weights: bool) -> list[str]:
    """Refuse what a checkpoint must not contain; return the Trainer state files left out (removed from
    `files`)."""
    skipped = sorted(path for path in files if _matches(path, TRAINER_STATE_FILES))
    for path in skipped:
        del files[path]
    unknown = sorted(path for path in files if not _matches(path, ALLOWED_CHECKPOINT_FILES))
    if unknown:
        raise PushError(
            f"The folder holds files that are not part of a checkpoint: {', '.join(unknown[:8])}. Only model, adapter, "
            "processor and card files are uploaded; move the others out of the folder."
        )
    disguised = sorted(
        path for path in files if not _matches(path, BINARY_FILES) and looks_like_weights(files[path])
    )
    if disguised:
        raise PushError(
            f"{', '.join(disguised)} hold(s) tensors (a weights archive under a text file's name): refusing to "
            "upload them."
        )
    if PEFT_CONFIG_NAME in files and is_peft_adapter_folder(os.path.dirname(files[PEFT_CONFIG_NAME])):
        raise PushError(
            "The folder holds a PEFT adapter (adapter_config.json) besides the checkpoint: transformers would load the "
            "repo as that PEFT adapter. Move adapter_config.json and adapter_model.safetensors to their own folder."
        )
    weights_name = next((n for n in (ADAPTER_WEIGHTS_NAME, LEGACY_ADAPTER_WEIGHTS_NAME) if n in files), None)
    if weights_name is not None and not include_backbone_weights:
        backbone = _adapter_file_tensors(files[weights_name])
        if backbone:
            raise PushError(
                f"{weights_name} holds backbone tensors ({', '.join(backbone[:3])}, ...): it is not an "
                "adapter-only file. Save the checkpoint with `model.save_pretrained(folder)`."
            )
    return skipped


def _weight_files(files: dict[str, str]) -> list[str]:
    return [
        path
        for path in files
        if any(fnmatch.fnmatch(os.path.basename(path), p) for p in BACKBONE_WEIGHT_PATTERNS)
    ]


def _write_json(path: str, values: dict[str, Any], sort_keys: bool = False) -> str:
    with open(path, "w") as f:
        json.dump(values, f, indent=2, sort_keys=sort_keys)
        f.write("\n")
    return path


def _plan(files: dict[str, str]) -> list[PlannedFile]:
    return [PlannedFile(path, os.path.getsize(files[path])) for path in sorted(files)]


def check_portable_backbones(config_path: str) -> None:
    """Refuse a checkpoint whose config.json names a backbone by a path on this machine: the pushed repo would
    load nowhere else."""
    with open(config_path) as f:
        found = local_backbone(json.load(f))
    if found:
        role, name = found
        raise PushError(
            f"config.json names the {role} backbone by a path on this machine ({name}): the repo would not load "
            "anywhere else. Point it at the Hub id of that backbone and save again: "
            f"`model = Model.from_pretrained(folder, {role}_model='org/name')` (the fingerprint check confirms "
            "it is the same backbone), then `model.save_pretrained(folder)`. Or pass --allow-local-backbones "
            "(`allow_local_backbones=True`) if the repo is only for machines that have that path."
        )


def local_backbone(config: dict[str, Any]) -> tuple[str, str] | None:
    """(role, path) of the first backbone that a model's config values name by a path on this machine (a portable
    mmadapters:// name or a Hub id is fine), else None."""
    for role in ("text", "vision"):
        name = (config.get(f"{role}_backbone") or {}).get("name_or_path")
        if name and (os.path.isabs(name) or name.startswith((".", "~")) or os.path.isdir(name)):
            return role, name
    return None


def checkpoint_files(
    folder: str,
    repo_id: str,
    generated: str,
    include_backbone_weights: bool = False,
    allow_local_backbones: bool = False,
    tags: list[str] | None = None,
    license: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    leave_out_other_files: bool = False,
) -> dict[str, str]:
    """What a checkpoint push uploads, checked (an adapter-only folder unless told): {path in the repo: local
    path}. The folder's files are uploaded from where they are; the model card (unless the folder has a
    README.md; `license` for it, else the backbones') and a legacy checkpoint's adapter_config.json pointing at the
    repo itself are written into `generated`. Files that are not part of a checkpoint are refused, or with
    `leave_out_other_files` (a Trainer's output folder: logs, metrics, checkpoint-N folders) left out."""
    if not os.path.isdir(folder):
        raise PushError(
            f"{folder} is not a folder. Save a checkpoint with `model.save_pretrained(folder)` first."
        )
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise PushError(f"{folder} has no config.json: it is not an mmadapters checkpoint folder.")
    if not allow_local_backbones:
        check_portable_backbones(os.path.join(folder, "config.json"))
    files = _folder_files(folder, (".git", ".cache"))
    if leave_out_other_files:
        files = {path: local for path, local in files.items() if is_checkpoint_file(path)}
    check_checkpoint_contents(files, include_backbone_weights)
    heavy = _weight_files(files)
    if heavy and not include_backbone_weights:
        raise PushError(
            f"{folder} holds backbone weights ({', '.join(heavy)}): it is a full checkpoint. Push an adapter-only "
            "folder (`save_pretrained(folder)`, the default), or pass --include-backbone-weights "
            "(`include_backbone_weights=True`) if you really mean to upload them."
        )
    if "README.md" not in files:
        files["README.md"] = os.path.join(generated, "README.md")
        try:
            card = build_model_card(folder, repo_id, license=license, endpoint=endpoint, token=token)
        except LicenseError as error:
            raise PushError(str(error)) from None
        card.data.tags = [
            *(card.data.tags or []),
            *[t for t in tags or [] if t not in (card.data.tags or [])],
        ]
        card.save(files["README.md"])
    if PEFT_CONFIG_NAME in files:  # a 0.1 checkpoint (a PEFT adapter beside ours was refused above)
        with open(files[PEFT_CONFIG_NAME]) as f:
            values = json.load(f)
        values["base_model_name_or_path"] = repo_id
        files[PEFT_CONFIG_NAME] = _write_json(os.path.join(generated, PEFT_CONFIG_NAME), values, True)
    return files


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
    allow_local_backbones: bool = False,
    dry_run: bool = False,
    retries: int = 4,
    retry_wait: float = 1.0,
    endpoint: str | None = None,
    create_pr: bool = False,
    revision: str | None = None,
    commit_description: str | None = None,
    tags: list[str] | None = None,
    license: str | None = None,
) -> list[PlannedFile] | str:
    """Upload an adapter-only checkpoint folder to `repo_id` (created if needed; an existing repo gets a new
    commit). Returns the commit URL (the pull request's with `create_pr=True`), or with `dry_run=True` the planned
    files without contacting the Hub. `revision`: the branch to commit to; `tags`: added to the model card's;
    `license`: the card's license (default: the backbones' common license, read from their cards)."""
    with tempfile.TemporaryDirectory() as generated:
        files = checkpoint_files(
            os.fspath(folder),
            repo_id,
            generated,
            include_backbone_weights,
            allow_local_backbones,
            tags,
            license,
            endpoint,
            token,
        )
        if dry_run:
            return _plan(files)
        return _upload(
            files,
            repo_id,
            {"private": private},
            commit_message or "Upload adapters with mmadapters",
            token,
            retries,
            retry_wait,
            endpoint,
            {"create_pr": create_pr, "revision": revision, "commit_description": commit_description},
        )


def space_files(folder: str, model: str, generated: str) -> dict[str, str]:
    """What a Space push uploads, checked (app.py, requirements.txt, a README.md with `sdk: gradio`, no model
    weights): {path in the repo: local path}. The README naming `model` under `models:` and
    `mmadapters_space.json` are written into `generated`."""
    from huggingface_hub import RepoCard

    if not os.path.isdir(folder):
        raise PushError(f"{folder} is not a folder (expected a Space folder such as spaces/lavin).")
    files = _folder_files(folder, ("__pycache__", ".git", "flagged", ".gradio"))
    missing = [name for name in ("app.py", "requirements.txt", "README.md") if name not in files]
    if missing:
        raise PushError(f"{folder} is not a Space folder: it lacks {', '.join(missing)}.")
    with open(files["README.md"]) as f:
        if "sdk: gradio" not in f.read():
            raise PushError(f"{folder}/README.md has no `sdk: gradio` front matter.")
    heavy = _weight_files(files) + [path for path in files if looks_like_weights(files[path])]
    if heavy:
        raise PushError(
            f"The Space folder holds model weights ({', '.join(sorted(set(heavy)))}): a Space loads its model from a "
            "model repo."
        )
    card = RepoCard.load(files["README.md"], repo_type="space")
    card.data.models = [model]
    files["README.md"] = os.path.join(generated, "README.md")
    card.save(files["README.md"])
    files[SPACE_SETTINGS_NAME] = _write_json(os.path.join(generated, SPACE_SETTINGS_NAME), {"model": model})
    return files


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
    create_pr: bool = False,
    revision: str | None = None,
    commit_description: str | None = None,
) -> list[PlannedFile] | str:
    """Upload a Space folder (spaces/lavin, spaces/crome) as a gradio Space serving `model` (a model repo id):
    the model is recorded in `mmadapters_space.json` (read by the app) and in the README's `models:` list.
    `create_pr`, `revision`, `commit_description`: as for `push_folder`."""
    with tempfile.TemporaryDirectory() as generated:
        files = space_files(os.fspath(folder), model, generated)
        if dry_run:
            return _plan(files)
        if _trained_on_quantised_backbones(model, endpoint, token):
            files["requirements.txt"] = _with_quant_extra(files["requirements.txt"], generated)
        return _upload(
            files,
            repo_id,
            {"private": private, "repo_type": "space", "space_sdk": "gradio"},
            f"Upload the Space (model {model}) with mmadapters",
            token,
            retries,
            retry_wait,
            endpoint,
            {"create_pr": create_pr, "revision": revision, "commit_description": commit_description},
        )


def _trained_on_quantised_backbones(model: str, endpoint: str | None, token: str | None) -> bool:
    """Whether the model repo's config.json records quantised backbones (LaVIN-lite): a Space serving it needs
    bitsandbytes. False when it cannot be read (the Space's app then says what is missing when it loads)."""
    from huggingface_hub import hf_hub_download

    try:
        with open(hf_hub_download(model, "config.json", endpoint=endpoint, token=token)) as f:
            return bool(json.load(f).get("backbone_quantization"))
    except Exception:  # offline, no such repo, no config: nothing to add
        return False


def _with_quant_extra(requirements: str, generated: str) -> str:
    """A copy of the Space's requirements.txt (written into `generated`) whose mmadapters line takes the `quant`
    extra too (bitsandbytes)."""
    with open(requirements) as f:
        lines = f.read().splitlines()
    for index, line in enumerate(lines):
        match = re.match(r"^mmadapters(\[([^\]]*)\])?(.*)$", line.strip())
        if match and "quant" not in (match.group(2) or ""):
            extras = [e for e in (match.group(2) or "").split(",") if e.strip()] + ["quant"]
            lines[index] = f"mmadapters[{','.join(extras)}]{match.group(3)}"
    path = os.path.join(generated, "requirements.txt")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def create_repo(
    repo_id: str,
    create_kwargs: dict[str, Any],
    token: str | None,
    retries: int = 4,
    retry_wait: float = 1.0,
    endpoint: str | None = None,
) -> str:
    """Create the repo, or keep the existing one; returns its full id (the namespace filled in), retrying transient
    failures. `create_kwargs`: `private`, `repo_type` of `HfApi.create_repo`."""
    from huggingface_hub import HfApi, constants, get_token

    endpoint = endpoint or constants.ENDPOINT
    api = HfApi(endpoint=endpoint, token=token)
    url = _with_retries(
        lambda: api.create_repo(repo_id, exist_ok=True, **create_kwargs),
        "create the repo",
        endpoint,
        token or get_token(),  # only to scrub it from messages: never printed
        retries,
        retry_wait,
    )
    return url.repo_id


def _upload(
    files: dict[str, str],
    repo_id: str,
    create_kwargs: dict[str, Any],
    commit_message: str,
    token: str | None,
    retries: int,
    retry_wait: float,
    endpoint: str | None,
    commit_kwargs: dict[str, Any] | None = None,
) -> str:
    """Create the repo (or keep the existing one) and commit `files` ({path in the repo: local path}), retrying
    transient failures. `commit_kwargs`: `create_pr`, `revision`, `commit_description` of `create_commit`."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token

    endpoint = endpoint or constants.ENDPOINT
    api = HfApi(endpoint=endpoint, token=token)
    repo_type = create_kwargs.get("repo_type")
    create_repo(repo_id, create_kwargs, token, retries, retry_wait, endpoint)
    token = token or get_token()  # only to scrub it from messages: never printed
    commit_kwargs = {k: v for k, v in (commit_kwargs or {}).items() if v}
    branch = commit_kwargs.get("revision")

    def make_branch() -> None:
        from huggingface_hub.errors import HfHubHTTPError

        try:
            api.create_branch(repo_id, branch=branch, repo_type=repo_type, exist_ok=True)
        except HfHubHTTPError as error:
            # A pull request to a repo we cannot write to: its branch must exist (the commit says if not).
            forbidden = error.response is not None and error.response.status_code == 403
            if not (forbidden and commit_kwargs.get("create_pr")):
                raise

    if branch and not branch.startswith("refs/pr/"):
        # The Hub refuses a commit to a branch the repo does not have: make it from main first, as
        # transformers' push_to_hub does.
        _with_retries(
            make_branch,
            f"create the branch {branch!r}",
            endpoint,
            token,
            retries,
            retry_wait,
        )

    def commit() -> Any:
        # Fresh operations on each attempt: the client refuses to reuse committed ones.
        operations = [
            CommitOperationAdd(path_in_repo=path, path_or_fileobj=local) for path, local in files.items()
        ]
        return api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message,
            repo_type=repo_type,
            **commit_kwargs,
        )

    info = _with_retries(commit, "upload the files", endpoint, token, retries, retry_wait)
    return info.pr_url or info.commit_url


def format_plan(planned: list[PlannedFile]) -> str:
    width = max(len(f.path) for f in planned)
    lines = [f"{f.path:<{width}}  {f.size / 1e6:10.3f} MB" for f in planned]
    lines.append(f"{'total':<{width}}  {sum(f.size for f in planned) / 1e6:10.3f} MB")
    return "\n".join(lines)
