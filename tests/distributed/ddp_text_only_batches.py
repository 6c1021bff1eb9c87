"""LaVIN trained by LavinTrainer under DDP (2 processes, gloo, `torchrun`) with activation checkpointing, on data
whose first batches hold no image: the vision side is unused in those steps. Prints "trained" on each process
when all steps ran; tests/test_distributed.py launches it."""

import os
import sys
import tempfile

import datasets
import torch
from cpu_run import CPU_RUN
from PIL import Image
from transformers import TrainingArguments

from mmadapters import LavinForConditionalGeneration, LavinProcessor
from mmadapters.modeling.transformers_compat import enable_activation_checkpointing
from mmadapters.trainers import LavinTrainer, VisionLanguageCollator

text_model, vision_model, images = sys.argv[1:4]
red = os.path.join(images, "red.png")
if not os.path.exists(red):
    Image.new("RGB", (32, 32), (255, 0, 0)).save(red)
rows = {"prompt": [], "target": [], "image": []}
for index in range(16):
    with_image = index >= 8  # sequential order: the first two steps see text-only samples on both processes
    rows["prompt"].append("Image: <image>\nwhat color?" if with_image else "Image: N/A\nsay hi")
    rows["target"].append(" red" if with_image else " hi")
    rows["image"].append(red if with_image else None)


class InOrderTrainer(LavinTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return None  # each process reads its shard in order (accelerate shards the batches)


torch.manual_seed(0)
model = LavinForConditionalGeneration.from_backbones(text_model, vision_model)
processor = LavinProcessor.from_backbones(text_model, vision_model)
enable_activation_checkpointing(model)  # non-reentrant, transformers' default
arguments = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=4, **CPU_RUN)
trainer = InOrderTrainer(
    model=model,
    args=arguments,
    train_dataset=datasets.Dataset.from_dict(rows),
    processing_class=processor,
    data_collator=VisionLanguageCollator(processor),
)
trainer.train()
assert arguments.ddp_find_unused_parameters is None  # the caller's arguments are left as given
print("trained", flush=True)
torch.distributed.destroy_process_group()  # a process group left to the interpreter's exit can abort it
