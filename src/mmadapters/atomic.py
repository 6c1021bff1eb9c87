"""Atomic checkpoint folders: a kill at any moment leaves either the old or the new checkpoint, never a mix.

Every save writes into a staging folder beside the target (`.NAME.staging-*`), flushes it to disk, then swaps it in:
on Linux with one `renameat2(RENAME_EXCHANGE)` (the two folders trade places atomically), elsewhere with two
renames (the old folder is first moved aside to `.NAME.previous-*`; if the process dies between the two renames,
the next save or load of NAME moves it back). Leftover staging folders are removed by the next save and are never
pushed (hub/push.py skips dot-folders).

Files of the old folder that the new save does not write are carried over (a README you wrote, eval results, the
processor files when only the model is saved), except those the save replaces as a whole (`replaces`): a model save
replaces the weights and the files that describe them, so no stale shard or adapter config survives next to new
weights.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .checkpoint_files import ADAPTER_WEIGHTS_NAME, LEGACY_ADAPTER_WEIGHTS_NAME, PEFT_CONFIG_NAME
from .errors import MMAdaptersError

STAGING = ".staging-"
PREVIOUS = ".previous-"
# What a model save replaces as a whole: weights and the files that describe them.
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".gguf",
    ".safetensors.index.json",
    ".bin.index.json",
)
# (adapter_config.json: a 0.1 checkpoint's; a PEFT adapter's is kept, see checkpoint_files.replaced_by_adapter_save)
MODEL_FILES = ("config.json", "generation_config.json", PEFT_CONFIG_NAME, "mmadapters_merge.json")


def replaced_by_model_save(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name in MODEL_FILES


_RENAME_EXCHANGE = 2


class DiskFullError(MMAdaptersError, OSError):
    """A save ran out of disk space (the previous checkpoint is intact)."""


@contextmanager
def atomic_directory(
    target: str | os.PathLike, replaces: Callable[[str], bool] = replaced_by_model_save
) -> Iterator[Path]:
    """Yield an empty staging folder; when the block ends without error, it replaces `target` atomically (old files
    it did not write are carried over unless `replaces(name)`). On error (a full disk, an exception in the writer)
    the staging folder is removed and `target` is untouched."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    # The writer's process id is in the name: `recover` never removes the staging folder of a live writer.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{STAGING}{os.getpid()}-", dir=target.parent))
    try:
        yield staging
        if target.is_dir():
            _carry_over(target, staging, replaces)
        _fsync_tree(staging)
        _swap_in(staging, target)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise DiskFullError(
                f"The disk is full: {target} could not be saved. Its previous content is intact; free some space "
                "(or save elsewhere) and save again."
            ) from error
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def recover(target: str | os.PathLike) -> None:
    """Finish what a killed save left behind at `target`: restore a folder moved aside if `target` is missing,
    and remove stale staging and moved-aside folders."""
    target = Path(target).absolute()
    if not target.parent.is_dir():
        return
    previous = sorted(target.parent.glob(f".{target.name}{PREVIOUS}*"), key=os.path.getmtime)
    if not target.exists() and previous:
        previous[-1].rename(target)
        previous = previous[:-1]
    staging = [p for p in target.parent.glob(f".{target.name}{STAGING}*") if not _writer_alive(p.name)]
    for leftover in [*previous, *staging]:
        shutil.rmtree(leftover, ignore_errors=True)


def _writer_alive(name: str) -> bool:
    """Whether the process that created staging folder `name` (`.NAME.staging-PID-...`) still runs."""
    try:
        pid = int(name.split(STAGING, 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_internal(name: str) -> bool:
    """Whether a file or folder name is one of our staging / moved-aside folders (never pushed or loaded)."""
    return name.startswith(".") and (STAGING in name or PREVIOUS in name)


def _carry_over(old: Path, new: Path, replaces: Callable[[str], bool]) -> None:
    for entry in old.iterdir():
        if (new / entry.name).exists() or replaces(entry.name) or is_internal(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, new / entry.name, follow_symlinks=False)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(folder)


def _fsync_dir(folder: str | Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _swap_in(staging: Path, target: Path) -> None:
    if not target.exists():
        staging.rename(target)
    elif _exchange(staging, target):
        pass  # `staging` now holds the old folder; the caller removes it
    else:
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}{PREVIOUS}", dir=target.parent))
        aside.rmdir()
        target.rename(aside)
        staging.rename(target)
        shutil.rmtree(aside, ignore_errors=True)
    _fsync_dir(target.parent)


def _exchange(first: Path, second: Path) -> bool:
    """Atomically exchange two paths with Linux's renameat2(RENAME_EXCHANGE); False where unavailable."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), _RENAME_EXCHANGE)
    return result == 0


class OutputFolderError(MMAdaptersError, ValueError):
    """An output folder that would overwrite an input or another checkpoint."""


CHECKPOINT_MARKERS = (
    "config.json",
    ADAPTER_WEIGHTS_NAME,
    LEGACY_ADAPTER_WEIGHTS_NAME,
    "model.safetensors",
    "model.safetensors.index.json",
)


def check_output_folder(
    output: str | os.PathLike, inputs: tuple[str | os.PathLike, ...], overwrite: bool
) -> None:
    """Refuse, before any work, an output folder that is (or contains, or is inside) one of the `inputs`, or that
    already holds a checkpoint, unless `overwrite` (the new checkpoint then replaces it atomically)."""
    out = Path(output).absolute().resolve()
    for source in inputs:
        source_path = Path(source).absolute().resolve()
        if not source_path.exists():
            continue  # a Hub id
        if out == source_path or source_path in out.parents or out in source_path.parents:
            raise OutputFolderError(
                f"The output folder {output} overlaps the input {source}: writing there would destroy what is being "
                "read. Choose another output folder."
            )
    if out.is_dir() and not overwrite and any((out / marker).exists() for marker in CHECKPOINT_MARKERS):
        raise OutputFolderError(
            f"The output folder {output} already holds a checkpoint. Choose an empty folder, or pass --overwrite "
            "to replace it (atomically: a failure leaves the old one)."
        )
