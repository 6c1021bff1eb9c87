"""Multi-process training on CPU: the README's launch commands as written, only the main process prints and
saves, and FSDP (frozen backbones + trainable adapters in the same units) equals one process."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_recipe
from safetensors.torch import load_file

from mmadapters import LavinForConditionalGeneration
from mmadapters.checkpoint_files import ADAPTER_WEIGHTS_NAME
from mmadapters.trainers.checkpoints import check_sharded_saving

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Multi-process training", 1)[1].split("\n### ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def run(command: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_readme_multi_process_commands_run_as_written(launcher, tiny_backbones, tmp_path):
    command = next(c for c in readme_commands() if c.startswith(launcher))
    recipe = write_recipe(
        tmp_path,
        tiny_backbones,
        data={"name": "easy_vqa", "split": "train", "limit": 32},
        training={
            "max_steps": 4,
            "save_steps": 2,
            "per_device_train_batch_size": 2,
            "use_cpu": True,
            "learning_rate": 5e-3,
            "logging_steps": 1,
            "dataloader_num_workers": 0,
        },
    )
    argv = shlex.split(command.replace("RECIPE.yaml", str(recipe)))
    # The command as written, on a free port (a concurrent run on this machine must not collide with it).
    if launcher == "accelerate":
        argv[2:2] = ["--main_process_port", str(free_port())]  # after `accelerate launch`
    else:
        argv[1:1] = ["--master_port", str(free_port())]
    completed = run(argv, tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    # Only the main process prints and saves.
    assert completed.stdout.count("Saved the adapter-only checkpoint") == 1, completed.stdout
    assert completed.stderr.count("Trainable parameters:") == 1
    state = json.loads((tmp_path / "run" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["epoch"] == pytest.approx(0.5)  # 4 steps x 2 samples x 2 processes = half of the 32 rows
    model = LavinForConditionalGeneration.from_pretrained(tmp_path / "run" / "final")
    assert torch.count_nonzero(model.llm_adapters[0].attn.expert_b.weight) > 0  # it trained


def test_fsdp_on_two_processes_equals_one_process(tiny_backbones, tmp_path):
    script = str(ROOT / "tests" / "distributed" / "fsdp_step.py")
    sharded = run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            script,
            str(tmp_path / "fsdp"),
            *tiny_backbones,
        ],
        tmp_path,
    )
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    single = run([sys.executable, script, str(tmp_path / "one"), *tiny_backbones], tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    # Both saved by save_pretrained: under FSDP from the state dict gathered as the Trainer gathers it.
    fsdp = load_file(tmp_path / "fsdp" / ADAPTER_WEIGHTS_NAME)
    one = load_file(tmp_path / "one" / ADAPTER_WEIGHTS_NAME)
    assert fsdp.keys() == one.keys() and any(k.startswith("vision_adapters.") for k in one)
    for name in one:
        torch.testing.assert_close(fsdp[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(one[k].abs().max() > 1e-3 for k in one if "expert_b" in k), "the experts did not move"


def test_ddp_with_activation_checkpointing_trains_through_batches_without_images(tiny_backbones, tmp_path):
    """transformers turns DDP's unused-parameter detection off under activation checkpointing; a batch without
    images (ScienceQA and LLaVA data have many) leaves the vision side unused, and DDP stopped at the next step
    ("Expected to have finished reduction in the prior iteration"). Our Trainers keep the detection on."""
    script = str(ROOT / "tests" / "distributed" / "ddp_text_only_batches.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    for attempt in range(2):
        completed = run(
            [*command, "--master_port", str(free_port()), script, *tiny_backbones, str(tmp_path)], tmp_path
        )
        # Under the lowest pins (transformers 5.20, accelerate 1.3) a process sometimes aborts after its training
        # finished, in torch's C++ teardown ("terminate called without an active exception"; about 1 run in 16 on
        # a loaded 2-core machine, never with the newest pins; cause not found). Such a run is repeated once; the
        # failure this test is about (DDP stopping at the second step) is deterministic and fails both attempts.
        teardown_abort = "terminate called without an active exception" in completed.stderr
        if completed.returncode == 0 or not teardown_abort or attempt == 1:
            break
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("trained") == 2


def test_shipped_launch_configs_are_valid():
    cpu = yaml.safe_load((ROOT / "recipes" / "accelerate" / "cpu-2-processes.yaml").read_text())
    assert cpu["distributed_type"] == "MULTI_GPU" and cpu["num_processes"] == 2
    fsdp = yaml.safe_load((ROOT / "recipes" / "accelerate" / "fsdp-gpus.yaml").read_text())
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_use_orig_params"] is True
    for stage in (2, 3):
        config = json.loads((ROOT / "recipes" / "deepspeed" / f"zero{stage}.json").read_text())
        assert config["zero_optimization"]["stage"] == stage
        # Batch sizes are left to the recipe's TrainingArguments (transformers fills "auto").
        assert config["train_micro_batch_size_per_gpu"] == "auto"
        check_sharded_saving(config, None)  # the adapters are gathered for every checkpoint
    check_sharded_saving(None, f"StateDictType.{fsdp['fsdp_config']['fsdp_state_dict_type']}")


def test_sharded_set_ups_that_would_not_save_the_adapters_are_refused():
    zero3 = {"zero_optimization": {"stage": 3}}
    with pytest.raises(ValueError, match="stage3_gather_16bit_weights_on_model_save"):
        check_sharded_saving(zero3, None)
    zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    with pytest.raises(ValueError, match="ZeRO-3 partitions every parameter"):
        check_sharded_saving(zero3, None)
    check_sharded_saving({"zero_optimization": {"stage": 2}}, None)  # ZeRO-2 keeps whole parameters
    with pytest.raises(ValueError, match="SHARDED_STATE_DICT.*FULL_STATE_DICT"):
        check_sharded_saving(None, "StateDictType.SHARDED_STATE_DICT")
