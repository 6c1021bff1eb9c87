"""Training-signal variants of the quickstart: do they teach LaVIN the yes/no questions within its budget?

The perfect-feature run (perfect_feature_quickstart.py) learns colour and shape but leaves yes/no (three
quarters of easy-vqa) at the question-only prior. Three changes to the training signal, alone or together:
- `--describe`: targets that first say what the image shows, then answer: " blue circle. no" (like ScienceQA's
  rationale-first formats): `load_easy_vqa(prompt_format="describe")`, which reads each image's colour and shape
  off its own questions and leaves out the images whose questions do not reveal both. Scored on the word after
  the description (`extract_described_answer`), on the same test questions as the plain runs.
- `--balance`: yes/no training questions balanced per question string (as many "yes" as "no" for each, the
  VQA v2 remedy against language priors), keeping easy-vqa's mix of question types.
- `--vision-lr-multiplier K`: the vision adapters learn K times faster than the rest (the random tower's
  features change only through them).
`--perfect` replaces the tower's features by perfect_feature_quickstart.py's clean colour + shape code;
`--whiten` builds LaVIN with `vision_feature_whitening=True`, fitted on the 4,000 easy-vqa train images (no
labels) before training (see experiments/feature_whitening.py).
Otherwise this is the quickstart's plain recipe (its default before the whitening: answer-word targets, vision
adapters on; the same optimiser and 10% text-only samples), scored on
`--num-test` test questions; the "before" evaluation and the text-only check are left out.

    python experiments/quickstart_variants.py [--describe] [--balance] [--vision-lr-multiplier 30] [--perfect]
        [--whiten]
"""

from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict

import datasets
import torch
from perfect_feature_quickstart import perfect_image_features

import mmadapters
from mmadapters import LavinForConditionalGeneration, LavinProcessor
from mmadapters.data import load_easy_vqa
from mmadapters.data.easy_vqa import YES_NO
from mmadapters.evaluation import generate_answers
from mmadapters.evaluation.scoring import accuracy_by_group, extract_described_answer, extract_word
from mmadapters.quickstart import (
    QuickstartSettings,
    fit_whitening_on_easy_vqa,
    text_prompt,
    training_arguments,
)
from mmadapters.quickstart_prompts import TRAINING_QUESTIONS
from mmadapters.trainers import LavinTrainer, VisionLanguageCollator


def balanced_yes_no(train: datasets.Dataset, size: int, rng: random.Random) -> list[int]:
    """Row indices: easy-vqa's share of open questions, and yes/no questions with as many "yes" as "no" for
    every question string."""
    by_answer, open_rows = defaultdict(list), []
    for index, (question, answer) in enumerate(zip(train["question"], train["answer"], strict=True)):
        (by_answer[question, answer] if answer in YES_NO else open_rows).append(index)
    yes_no = []
    for question in {question for question, _ in by_answer}:
        yes, no = by_answer[question, "yes"], by_answer[question, "no"]
        count = min(len(yes), len(no))
        yes_no += rng.sample(yes, count) + rng.sample(no, count)
    rng.shuffle(yes_no)
    rng.shuffle(open_rows)
    num_open = round(size * len(open_rows) / len(train))
    return open_rows[:num_open] + yes_no[: size - num_open]


class VisionLearningRateTrainer(LavinTrainer):
    """LavinTrainer whose vision adapters get `vision_lr_multiplier` times the learning rate."""

    def __init__(self, *args, vision_lr_multiplier: float = 1.0, **kwargs) -> None:
        self.vision_lr_multiplier = vision_lr_multiplier
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            vision = [p for n, p in named if n.startswith("vision_adapters.")]
            rest = [p for n, p in named if not n.startswith("vision_adapters.")]
            lr = self.args.learning_rate
            groups = [{"params": rest}, {"params": vision, "lr": lr * self.vision_lr_multiplier}]
            optimizer_class, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer = optimizer_class(groups, **{**optimizer_kwargs, "weight_decay": 0.0})
        return self.optimizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--describe", action="store_true")
    parser.add_argument("--balance", action="store_true")
    parser.add_argument("--vision-lr-multiplier", type=float, default=1.0)
    parser.add_argument("--perfect", action="store_true")
    parser.add_argument("--whiten", action="store_true")
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=QuickstartSettings.learning_rate)
    parser.add_argument("--num-test", type=int, default=300)
    args = parser.parse_args()
    settings = QuickstartSettings(train_steps=args.train_steps, learning_rate=args.learning_rate)
    rng = random.Random(settings.seed)

    text_model, vision_model = mmadapters.embedded_backbones()
    torch.manual_seed(settings.seed)
    if args.perfect:
        LavinForConditionalGeneration.get_image_features = perfect_image_features
    model = LavinForConditionalGeneration.from_backbones(
        text_model, vision_model, vision_feature_whitening=args.whiten
    )
    processor = LavinProcessor.from_backbones(text_model, vision_model)
    if args.whiten:
        fit_whitening_on_easy_vqa(model, processor)
    prompts = [text_prompt(q) for q in TRAINING_QUESTIONS]  # the 20 hand-written ones, as when this ran
    llm_answers = generate_answers(model, processor, prompts, [None] * len(prompts), max_new_tokens=16)

    num_samples = settings.train_steps * settings.batch_size
    num_text = int(num_samples * settings.text_fraction)
    train = load_easy_vqa("train", prompt_format="describe" if args.describe else "open")
    if args.balance:
        indices = balanced_yes_no(train, num_samples - num_text, rng)
    else:
        indices = rng.sample(range(len(train)), num_samples - num_text)
    rows = [
        {"prompt": r["prompt"], "target": r["target"], "image": r["image"]} for r in train.select(indices)
    ]
    rows += [
        {"prompt": prompts[i % len(prompts)], "target": llm_answers[i % len(prompts)], "image": None}
        for i in range(num_text)
    ]
    rng.shuffle(rows)
    for row in rows:
        row["length"] = len(processor.tokenizer(row["prompt"] + row["target"])["input_ids"])
    trainer = VisionLearningRateTrainer(
        model=model,
        args=training_arguments("/tmp/quickstart_variants", settings, disable_tqdm=True),
        train_dataset=datasets.Dataset.from_list(rows),
        data_collator=VisionLanguageCollator(processor),
        processing_class=processor,
        vision_lr_multiplier=args.vision_lr_multiplier,
    )
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start

    test = load_easy_vqa("test", limit=args.num_test, seed=settings.seed)
    generations = generate_answers(
        model,
        processor,
        test["prompt"],
        test["image"],
        batch_size=64,
        max_new_tokens=8 if args.describe else 4,
    )
    extract = extract_described_answer if args.describe else extract_word
    predictions = [extract(text, choices) for text, choices in zip(generations, test["choices"], strict=True)]
    result = accuracy_by_group(predictions, test["answer"], test["question_type"])
    by_type = ", ".join(f"{kind} {accuracy:.3f}" for kind, accuracy in sorted(result["by_group"].items()))
    print(
        f"describe={args.describe} balance={args.balance} vision_lr_multiplier={args.vision_lr_multiplier:g} "
        f"perfect={args.perfect} whiten={args.whiten} lr={args.learning_rate:g}, {args.train_steps} steps, {args.num_test} test "
        f"questions: accuracy "
        f"{result['accuracy']:.3f} ({by_type}; unparsed {result['unparsed']}), training {train_seconds:.0f} s"
    )
    print(f"first generations: {generations[:6]}")


if __name__ == "__main__":
    from mmadapters.library_logs import quiet_library_logs

    quiet_library_logs()
    main()
