"""Trainer checkpoints: which `checkpoint-N` folders were written to the end (a run killed while saving leaves an
incomplete one), and the last complete one of a run (what `--resume` continues from)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback

from ..checkpoint_files import ADAPTER_WEIGHTS_NAME, adapter_weights_file

CHECKPOINT_PREFIX = "checkpoint-"


def checkpoint_is_complete(folder: str | os.PathLike) -> str | None:
    """None if the Trainer checkpoint `folder` was written to the end, else what is missing or broken.

    transformers writes a checkpoint's model first, then optimizer, scheduler and RNG states, and
    `trainer_state.json` last: a kill anywhere before leaves no (or an unreadable) trainer_state.json, or a
    truncated archive."""
    import json
    import zipfile

    from safetensors import safe_open

    state = os.path.join(folder, "trainer_state.json")
    try:
        with open(state) as f:
            json.load(f)
    except (OSError, ValueError):
        return "no readable trainer_state.json (the run was stopped while saving it)"
    weights = adapter_weights_file(folder) or os.path.join(folder, ADAPTER_WEIGHTS_NAME)
    try:
        with safe_open(weights, framework="pt") as handle:
            list(handle.keys())
    except Exception as error:  # safetensors raises its own error types for truncated files
        return f"{os.path.basename(weights)} is missing or truncated ({type(error).__name__})"
    for name in sorted(os.listdir(folder)):
        if name.endswith((".pt", ".pth")) and not zipfile.is_zipfile(os.path.join(folder, name)):
            return f"{name} is truncated"
    return None


def find_last_checkpoint(output_dir: str | os.PathLike, log: Callable[[str], Any] = print) -> str | None:
    """The last complete `checkpoint-N` in `output_dir` (incomplete ones are skipped, each with a message)."""
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX) :].isdigit():
            steps.append(int(name[len(CHECKPOINT_PREFIX) :]))
    for step in sorted(steps, reverse=True):
        folder = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
        problem = checkpoint_is_complete(folder)
        if problem is None:
            return folder
        log(f"Skipping the incomplete checkpoint {folder}: {problem}.")
    return None


def check_sharded_saving(deepspeed_config: dict | None, fsdp_state_dict_type: str | None) -> None:
    """Refuse, before training starts, a sharded set-up whose checkpoints would not hold the adapters.

    Under DeepSpeed ZeRO-3 and FSDP each process holds a shard of every parameter; the Trainer hands an
    adapter-only save the whole state dict only with ZeRO-3's `stage3_gather_16bit_weights_on_model_save` and
    FSDP's FULL_STATE_DICT. Otherwise it would save nothing of the adapters (or, read from the shard, a part)."""
    zero = (deepspeed_config or {}).get("zero_optimization") or {}
    gathers = zero.get(
        "stage3_gather_16bit_weights_on_model_save", zero.get("stage3_gather_fp16_weights_on_model_save")
    )
    if zero.get("stage") == 3 and gathers is not True:
        raise ValueError(
            "DeepSpeed ZeRO-3 partitions every parameter across the processes, and the adapters are saved only if "
            'the Trainer gathers them: set "stage3_gather_16bit_weights_on_model_save": true under '
            '"zero_optimization" (recipes/deepspeed/zero3.json does).'
        )
    if fsdp_state_dict_type is not None and "FULL_STATE_DICT" not in fsdp_state_dict_type:
        raise ValueError(
            f"FSDP with {fsdp_state_dict_type}: the Trainer then writes no model weights into its checkpoints, so "
            "the adapters would not be saved. Use fsdp_state_dict_type: FULL_STATE_DICT (recipes/accelerate/"
            "fsdp-gpus.yaml does)."
        )


class StepBoundary(TrainerCallback):
    """Whether training is between optimizer steps, where the weights, optimizer and schedule are all those of
    `state.global_step`: a checkpoint written after an error there holds a state a run can resume from. From the
    optimizer step until `global_step` counts it, the weights are ahead of the count (whatever other callbacks do
    meanwhile: the count is what tells)."""

    def __init__(self) -> None:
        self.optimizer_step_began_at: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.optimizer_step_began_at = None

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.optimizer_step_began_at = state.global_step

    def between_steps(self, state: Any) -> bool:
        return self.optimizer_step_began_at is None or state.global_step > self.optimizer_step_began_at
