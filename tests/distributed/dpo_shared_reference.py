"""TRL's DPOTrainer mixed with LavinTrainer under DDP (2 processes, gloo, `torchrun`): training against the shared
reference (the model itself with its starting trainable weights, `mmadapters/trainers/reference.py`) equals
training against a separate copy of the starting model, step for step. Prints "equal" on each process when it
does; tests/test_distributed.py launches it."""

import copy
import sys
import tempfile

import datasets
import torch
from cpu_run import CPU_RUN
from PIL import Image
from trl import DPOConfig, DPOTrainer

from mmadapters import LavinForConditionalGeneration, LavinProcessor
from mmadapters.trainers import LavinTrainer


class LavinDPOTrainer(LavinTrainer, DPOTrainer):
    pass


def message(role: str, *content: dict) -> list[dict]:
    return [{"role": role, "content": list(content)}]


text_model, vision_model = sys.argv[1:3]
question = message("user", {"type": "image"}, {"type": "text", "text": "what color?"})
rows = datasets.Dataset.from_dict(
    {
        "images": [[Image.new("RGB", (32, 32), "red")]] * 8,
        "prompt": [question] * 8,
        "chosen": [message("assistant", {"type": "text", "text": "red"})] * 8,
        "rejected": [message("assistant", {"type": "text", "text": "blue"})] * 8,
    }
)


def train(separate_reference: bool) -> tuple[dict, dict, list]:
    """The starting and the trained trainable weights, and the logs, of 3 DPO steps."""
    torch.manual_seed(0)
    model = LavinForConditionalGeneration.from_backbones(text_model, vision_model)
    processor = LavinProcessor.from_backbones(text_model, vision_model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # adapters that change the output (LaVIN's start as the identity)
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    start = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    arguments = DPOConfig(
        output_dir=tempfile.mkdtemp(), max_steps=3, learning_rate=1e-2, logging_steps=1, bf16=False, **CPU_RUN
    )
    trainer = LavinDPOTrainer(
        model=model,
        args=arguments,
        train_dataset=rows,
        processing_class=processor,
        **({"ref_model": copy.deepcopy(model)} if separate_reference else {}),
    )
    assert separate_reference or sum(p.numel() for p in trainer.ref_model.parameters()) == 0
    trainer.train()
    trained = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    logs = [
        {key: value for key, value in entry.items() if "runtime" not in key and "per_second" not in key}
        for entry in trainer.state.log_history
    ]
    return start, trained, logs


start, shared, logs = train(separate_reference=False)
_, separate, logs_against_copy = train(separate_reference=True)
assert any(not torch.equal(shared[name], start[name]) for name in start)  # it trained
assert logs == logs_against_copy, (logs, logs_against_copy)
for name, value in separate.items():
    assert torch.equal(shared[name], value), name
print("equal", flush=True)
torch.distributed.destroy_process_group()  # a process group left to the interpreter's exit can abort it
