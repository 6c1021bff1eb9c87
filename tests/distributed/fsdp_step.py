"""Two training steps of LaVIN under torch FSDP (2 processes, gloo, `torchrun`) or in one process (plain `python`),
then the checkpoint saved (and, under FSDP, resumed into a fresh wrapped model): tests/test_distributed.py compares
the saved adapter weights. FSDP is set up as accelerate's FSDP plugin does it
(`use_orig_params=True`, transformer-layer auto-wrap), with the frozen backbones and the trainable adapters mixed
in the same units. accelerate itself enables FSDP only on GPU-type setups, hence torch's API here."""

import functools
import os
import sys

import torch
import torch.distributed as dist
from PIL import Image

from mmadapters import LavinForConditionalGeneration, LavinProcessor
from mmadapters.trainers import VisionLanguageCollator

output, text_model, vision_model = sys.argv[1:4]
distributed = "WORLD_SIZE" in os.environ
if distributed:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

torch.manual_seed(0)
model = LavinForConditionalGeneration.from_backbones(text_model, vision_model)
for module in model.modules():
    if isinstance(module, torch.nn.Dropout):
        module.p = 0.0
processor = LavinProcessor.from_backbones(text_model, vision_model)
red, blue = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
# The global batch: each process takes the same mix (one image row, one text-only row), so every process
# supervises as many tokens and the mean of the processes' losses is the loss of the whole batch.
rows = [
    {"prompt": "Image: <image>\nwhat color?", "target": " hi", "image": red},
    {"prompt": "Image: N/A\nsay hi", "target": " hi", "image": None},
    {"prompt": "Image: <image>\nwhat color?", "target": " hi", "image": blue},
    {"prompt": "Image: N/A\nsay yo", "target": " hi", "image": None},
]
batch = VisionLanguageCollator(processor)(rows[2 * rank : 2 * rank + 2] if distributed else rows)

if distributed:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    policy = functools.partial(
        transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer, CLIPEncoderLayer}
    )
    trained = FSDP(model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
else:
    trained = model
optimizer = torch.optim.SGD([p for p in trained.parameters() if p.requires_grad], lr=0.5)
for _ in range(2):
    optimizer.zero_grad()
    trained(**batch).loss.backward()
    optimizer.step()

# Saved as the Trainer saves under FSDP: every process takes part in gathering the full state dict as accelerate's
# get_state_dict does (rank 0 gets it; offload_to_cpu is left off: on a CPU-only run it crashes torch), and
# save_pretrained writes the adapters from it on the main process. Reading the live module there instead would
# start a gather on one process alone and wait for ever.
if distributed:
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType

    gather = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
    with FSDP.state_dict_type(trained, StateDictType.FULL_STATE_DICT, gather):
        state = trained.state_dict()
    model.save_pretrained(output, state_dict=state, is_main_process=rank == 0)
    dist.barrier()

    # Resumed as our Trainer resumes under FSDP: a fresh model, wrapped, then the checkpoint loaded into it on
    # every process. Each process's shard must then hold the saved values.
    from safetensors.torch import load_file

    from mmadapters.trainers.trainer import load_adapter_checkpoint

    torch.manual_seed(1)
    fresh = LavinForConditionalGeneration.from_backbones(text_model, vision_model)
    fresh_wrapped = FSDP(fresh, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
    load_adapter_checkpoint(output, fresh, fresh_wrapped)
    saved = load_file(os.path.join(output, "mmadapters_model.safetensors"))
    with FSDP.summon_full_params(fresh_wrapped):
        resumed = fresh.state_dict()
        wrong = [name for name in saved if not torch.equal(resumed[name], saved[name])]
    if wrong:
        sys.exit(f"rank {rank}: resumed adapters differ from the checkpoint: {wrong[:5]}")
    # Both processes leave together: gloo aborted one ("terminate called without an active exception") when the
    # other tore its connections down first (seen once in CI).
    dist.barrier()
    dist.destroy_process_group()
else:
    model.save_pretrained(output)
