"""Multi-process training on CPU: the README's launch commands as written, only the main process prints and
saves, and FSDP (frozen backbones + trainable adapters in the same units) equals one process."""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
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


def test_dpo_mixed_with_our_trainer_shares_its_reference_under_ddp(tiny_backbones, tmp_path):
    """Under DDP (2 processes), TRL's DPOTrainer mixed with ours and given no ref_model trains against the model
    with its starting trainable weights exactly as against a separate copy of the starting model (the policy is
    wrapped in DistributedDataParallel; the reference pass runs the unwrapped model, its weights swapped in and
    back)."""
    pytest.importorskip("trl")
    script = str(ROOT / "tests" / "distributed" / "dpo_shared_reference.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    completed = run([*command, "--master_port", str(free_port()), script, *tiny_backbones], tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("equal") == 2


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


def data_parallel_replicas(model: torch.nn.Module, count: int, monkeypatch) -> list[torch.nn.Module]:
    """The copies nn.DataParallel makes at every step (torch's own `replicate`), here on CPU: only the broadcast of
    the tensors to the GPUs is replaced, by differentiable copies."""
    replicate_module = importlib.import_module("torch.nn.parallel.replicate")

    def copy_to_each_device(tensors, devices, detach=False):
        return [[t.detach().clone() if detach else t.clone() for t in tensors] for _ in devices]

    monkeypatch.setattr(replicate_module, "_broadcast_coalesced_reshape", copy_to_each_device)
    return replicate_module.replicate(model, list(range(count)))


@pytest.mark.parametrize(
    "kind, routing, checkpointing",
    [
        ("lavin", "learned", False),
        ("lavin", "modality", False),
        ("lavin", "learned", True),
        ("crome", None, False),
    ],
)
def test_data_parallel_replicas_run_and_train_their_own_adapters(kind, routing, checkpointing, monkeypatch):
    """transformers' Trainer wraps the model in nn.DataParallel on several GPUs in one process: each replica must
    compute what the model computes and send its gradients through its own copies of the adapters (the copies
    of hooked modules share the original's hooks, which are bound to the original adapters)."""
    from conftest import tiny_model_from_configs

    from mmadapters import MMAdapterConfig

    torch.manual_seed(0)
    if kind == "lavin":
        model = tiny_model_from_configs(
            kind, adapter_config=MMAdapterConfig(placement="attn_mlp", llm_routing=routing)
        )
        extra = {}
    else:
        model = tiny_model_from_configs(kind)
        extra = {"qformer_input_ids": torch.tensor([[5, 6, 7]])}  # one instruction per image
    for module in model.modules():  # the replicas must compute what the model computes
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for parameter in model.parameters():  # adapters away from their identity start, so that they matter
        if parameter.requires_grad:
            parameter.data.normal_(0, 0.05)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    n = model.config.num_image_tokens
    input_ids = torch.tensor(
        [[1] + [300] * n + [40, 50], [1, 7, 8] + [40] * n]
    )  # an image sample, a text one
    inputs = {"input_ids": input_ids, "pixel_values": torch.randn(1, 3, 32, 32), **extra}
    inputs["labels"] = input_ids.masked_fill(input_ids == 300, -100)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    expected_loss = model(**inputs).loss
    expected_grads = torch.autograd.grad(expected_loss, list(trained.values()), allow_unused=True)

    replicas = data_parallel_replicas(model, 2, monkeypatch)
    losses = {}

    def run(j: int) -> None:
        try:
            losses[j] = replicas[j](**inputs).loss
        except Exception as error:  # re-raised below, in the test's thread
            losses[j] = error

    threads = [threading.Thread(target=run, args=(j,)) for j in range(2)]  # as DataParallel's parallel_apply
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for loss in losses.values():
        if isinstance(loss, Exception):
            raise loss
    for j, replica in enumerate(replicas):
        torch.testing.assert_close(losses[j], expected_loss, atol=1e-5, rtol=1e-5)
        copies = {  # the replica's own copies of the trained parameters (what DataParallel reduces)
            f"{prefix}.{key}".lstrip("."): tensor
            for prefix, module in replica.named_modules()
            for key, tensor in module._former_parameters.items()
        }
        grads = torch.autograd.grad(losses[j], [copies[name] for name in trained], allow_unused=True)
        for name, grad, expected in zip(trained, grads, expected_grads, strict=True):
            if expected is None:  # not used by this forward (CROME: what this stage does not train)
                continue
            assert grad is not None, f"replica {j}: no gradient reaches its copy of {name}"
            torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["lavin", "crome"])
def test_one_process_on_several_gpus_is_refused_when_the_trainer_is_built(
    kind, tiny_backbones, tmp_path, monkeypatch
):
    """There the Trainer would wrap the model in nn.DataParallel, which cuts a batch's images apart from their
    samples: refused with the launch that works (one process per GPU), before anything trains."""
    from conftest import make_trainer, toy_dataset
    from transformers import TrainingArguments

    from mmadapters import CromeForConditionalGeneration, CromeProcessor, LavinProcessor
    from mmadapters.trainers import CromeTrainer, LavinTrainer

    if kind == "lavin":
        model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
        processor, trainer_class = LavinProcessor.from_backbones(*tiny_backbones), LavinTrainer
    else:
        model = CromeForConditionalGeneration.from_backbones(*tiny_backbones, num_query_tokens=4)
        processor = CromeProcessor.from_backbones(
            *tiny_backbones, num_image_tokens=model.config.num_image_tokens
        )
        trainer_class = CromeTrainer
    dataset = toy_dataset(tmp_path)
    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 2))
    with pytest.raises(ValueError, match=r"sees 2 GPUs.*nn\.DataParallel.*torchrun --nproc_per_node 2"):
        make_trainer(model, processor, dataset, tmp_path / "out", trainer_class=trainer_class)
    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 1))
    assert (
        make_trainer(model, processor, dataset, tmp_path / "out", trainer_class=trainer_class).model is model
    )
