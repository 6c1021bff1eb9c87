"""Run under `torchrun --nproc_per_node 2` by tests/test_cli_and_distributed.py: a 2-process DDP run on CPU (gloo)."""

import sys

import datasets
import torch
from transformers import TrainingArguments

from mmadapters import LavinForConditionalGeneration, LavinProcessor
from mmadapters.trainers import LavinTrainer, VisionLanguageCollator

output_dir, text_model, vision_model = sys.argv[1:4]
torch.manual_seed(0)
model = LavinForConditionalGeneration.from_backbones(text_model, vision_model)
processor = LavinProcessor.from_backbones(text_model, vision_model)
rows = [{"prompt": "Image: N/A\nsay hi", "target": " hi", "image": None}] * 16
args = TrainingArguments(
    output_dir=output_dir,
    per_device_train_batch_size=2,
    max_steps=3,
    learning_rate=1e-2,
    use_cpu=True,
    ddp_backend="gloo",
    report_to=[],
    remove_unused_columns=False,
    save_strategy="no",
    seed=0,
)
trainer = LavinTrainer(
    model=model,
    args=args,
    train_dataset=datasets.Dataset.from_list(rows),
    data_collator=VisionLanguageCollator(processor),
    processing_class=processor,
)
trainer.train()
assert trainer.args.world_size == 2, trainer.args.world_size
trainer.save_model(output_dir)
trainer.accelerator.wait_for_everyone()  # every rank leaves together (a rank exiting alone can abort gloo)
