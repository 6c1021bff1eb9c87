"""The quickstart (README command 1): fine-tune LaVIN on easy-vqa on the embedded backbones, offline.

Steps: build LaVIN around SmolLM2-135M-Instruct and the embedded vision tower; record the LLM's own answers to
held-out text-only prompts (LaVIN at initialisation answers exactly like the bare LLM: the experts start at zero,
a tested property); evaluate on easy-vqa test questions; train with `LavinTrainer` (optionally with text-only
samples mixed in, `text_fraction`); evaluate again; check how many held-out text-only answers are unchanged; save
the adapter-only checkpoint; write `quickstart_summary.json`.

For the embedded random vision tower and a 10-minute CPU budget the defaults depart from the paper's plain recipe
in marked ways (each a `QuickstartSettings` field and a CLI flag): whitened visual features, no vision adapters,
targets that first say what the image shows, batches of 8 rather than the paper's 32 (more updates in the same
time), no dropout in the adapters (0.1 in the paper), bfloat16 mixed precision where the CPU computes it
natively, and the LLM-side routing fixed by modality (ours) with no text-only samples. Why, with the
measurements: benchmarks/README.md, "Quickstart".
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .precision import native_bfloat16
from .quickstart_prompts import HELD_OUT_QUESTIONS, training_questions
from .validation import positive_float, positive_int


def _setting(default: Any, help: str, **argparse_options: Any) -> Any:
    """A QuickstartSettings field: its default, and the help and argparse options of its `mmadapters quickstart`
    flag (the flags are generated from these fields: `mmadapters.cli_arguments`)."""
    return field(default=default, metadata={"help": help, **argparse_options})


@dataclass
class QuickstartSettings:
    """The quickstart's knobs; the defaults are what README command 1 runs."""

    # Many small steps rather than few large ones: per sample a step costs the same on this CPU, and the yes/no
    # comparison emerges with the number of updates (benchmarks/README.md, "Quickstart": in about the same time
    # and with dropout 0.1, 160 x 32 reached 0.819 on 1,000 questions, 520 x 8 0.917).
    train_steps: int = _setting(800, "optimizer steps", type=positive_int)
    batch_size: int = _setting(8, "training samples per step", type=positive_int)
    # 2e-3: with 3e-3 seed 2's yes/no comparison did not emerge within 800 steps (0.855 on 1,000 questions); at
    # 2e-3 it did (0.927 on 300), and seeds 0 and 4 ended with half the loss (benchmarks/README.md, "Quickstart").
    learning_rate: float = _setting(
        2e-3, "peak learning rate (cosine schedule, 10%% warm-up)", type=positive_float
    )
    # No text-only samples by default (the paper mixes them in; --text-fraction 0.1 does): with the modality routing
    # below they would train only the text-only path, and the only text data offline is the LLM's own answers,
    # on which training moved that path (8 of 40 held-out first sentences kept; benchmarks/README.md).
    text_fraction: float = _setting(
        0.0, "share of text-only samples (the LLM's own answers) in the training mixture", type=float
    )
    num_test: int = _setting(1000, "easy-vqa test questions to evaluate on", type=positive_int)
    eval_batch_size: int = _setting(64, "questions per generate call in the evaluations", type=positive_int)
    text_max_new_tokens: int = _setting(
        16, "tokens generated for each held-out text-only prompt (text_only_preserved)", type=positive_int
    )
    seed: int = _setting(
        0,
        "seeds the adapters' initialisation, the training draw and order, and the test questions drawn",
        type=int,
    )
    # "describe" trains on " blue circle. no" (the image's colour and shape, then the answer): every sample
    # then teaches what the image shows, and the yes/no answers become a comparison; "open": the answer word.
    prompt_format: str = _setting(
        "describe",
        'training targets: "describe": the image\'s colour and shape, then the answer; "open": the answer word',
        choices=("open", "describe"),
    )
    # Whiten the random tower's visual features (fitted on the unlabeled train images; LavinConfig docs): its
    # features hold colour and shape, but too badly conditioned for the projector to find within the budget.
    feature_whitening: bool = _setting(
        True, "whiten the random tower's visual features, fitted on the unlabeled train images"
    )
    # Adapters inside the (random) vision tower: off. The whitening is fitted on the tower's features, and
    # vision adapters that move them are amplified in its low-variance directions (benchmarks/README.md).
    vision_adapters: bool = _setting(False, "adapters inside the vision tower too, as in the paper")
    # Dropout inside the adapters: 0 (the paper: 0.1). With one short pass over the data there is little to
    # overfit, and dropout slowed the yes/no comparison: seed 1 reached 0.816 with 0.1, 0.900 with 0 (benchmarks).
    adapter_dropout: float = _setting(0.0, "dropout inside the adapters (the paper's is 0.1)", type=float)
    # Ours, not the paper's: the LLM-side routing fixed by modality (text only: expert D; with an image: expert B),
    # so that the easy-vqa updates cannot reach the text-only path (MMAdapterConfig.llm_routing). With the paper's
    # learned router the weights stay at 0.5 / 0.5 through the run and 6 of 40 held-out text-only answers keep
    # their first sentence (benchmarks/README.md, "Quickstart").
    llm_routing: str = _setting(
        "modality",
        'LLM-side routing: "modality", fixed by the modality (ours), or "learned", the paper\'s router',
        choices=("modality", "learned"),
    )
    # Ours, not the paper's (off by default): an extra loss on text-only samples, the KL divergence from the frozen
    # LLM (adapters bypassed) to LaVIN at every token (LavinTrainer's `text_distillation`), for text_only_preserved.
    # Ours: False leaves the text-only samples without cross-entropy targets, to the distillation alone.
    text_answer_loss: bool = _setting(
        True, "cross-entropy on the LLM's own answers for the text-only samples (the paper's mixture)"
    )
    text_distillation: float = _setting(
        0.0, "weight of the text-only distillation loss towards the frozen LLM (ours; 0 = off)", type=float
    )
    # Mixed precision (bfloat16 autocast, float32 weights and optimizer), as GPU training usually runs: on a CPU
    # with AVX-512 bfloat16 a step takes about 0.6 of the float32 time, on an AVX2-only CPU (emulated bfloat16) 16
    # times (benchmarks/README.md, "Quickstart"): on by default only where the CPU computes bfloat16 natively.
    # The vision tower and the whitening stay float32 (LavinForConditionalGeneration.get_image_features).
    bf16: bool = field(
        default_factory=native_bfloat16,
        metadata={
            "help": "train in bfloat16 mixed precision (evaluations stay float32); the default is on where the CPU "
            "computes bfloat16 natively (AVX-512, Arm BF16), else off"
        },
    )
    adapter_placement: str = _setting(
        "attn",
        'adapters before each self-attention ("attn", the paper\'s) or before each MLP too ("attn_mlp")',
        choices=("attn", "attn_mlp"),
    )


def training_arguments(output_dir: str, settings: QuickstartSettings, **overrides: Any) -> Any:
    """The quickstart's `TrainingArguments` (AdamW with beta2 0.95, cosine schedule with 10% warm-up, no weight
    decay, CPU, batches grouped by length); `overrides` replace any of them."""
    from transformers import TrainingArguments

    values = dict(
        output_dir=output_dir,
        max_steps=settings.train_steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, settings.train_steps // 10),
        weight_decay=0.0,
        adam_beta2=0.95,
        logging_steps=max(1, settings.train_steps // 10),
        # A checkpoint every eighth of the run (adapters and optimizer state, a few megabytes; only the last kept):
        # a run killed where no error handler runs (out of memory, a closed laptop) continues with --resume.
        save_strategy="steps",
        save_steps=max(1, settings.train_steps // 8),
        save_total_limit=1,
        use_cpu=True,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=settings.seed,
        train_sampling_strategy="group_by_length",
        disable_tqdm=False,
        bf16=settings.bf16,
    )
    return TrainingArguments(**{**values, **overrides})


def fit_whitening_on_easy_vqa(model: Any, processor: Any) -> int:
    """Fit LaVIN's visual feature whitening on the 4,000 easy-vqa train images (the images only, no questions
    or answers); returns how many images it saw."""
    import easy_vqa

    from .modeling.lavin.feature_whitening import fit_whitening_on_images

    paths = easy_vqa.get_train_image_paths()
    return fit_whitening_on_images(model, processor, [paths[image_id] for image_id in sorted(paths)])


def first_sentence(answer: str) -> str:
    """The answer proper: its first sentence (up to . ! ? or a line break), whitespace-normalised. The 16
    generated tokens often run on past it, and the run-on part is not the answer to the question."""
    match = re.match(r"[^.!?\n]*[.!?]?", answer.strip())
    return " ".join(match.group(0).split()) if match else ""


def text_prompt(question: str) -> str:
    return f"Image: N/A\nQuestion: {question}\nAnswer:"


@contextmanager
def no_loading_bars() -> Iterator[None]:
    """Hide transformers' per-tensor "Loading weights" bars (two bars of a fraction of a second each for the
    embedded backbones) while the backbones load; the state before is restored afterwards."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def accuracy_line(result: dict[str, Any]) -> str:
    by_type = ", ".join(f"{name} {value:.3f}" for name, value in result["by_group"].items())
    return f"      accuracy {result['accuracy']:.3f} ({by_type})"


def keep_earlier_run(output_dir: Path, log: Any = print) -> Path | None:
    """Move an earlier run's `checkpoint/` and `quickstart_summary.json` in `output_dir` aside, to
    `checkpoint.<time it was saved>/` and `quickstart_summary.<same time>.json`, rather than overwrite them: a
    rerun (with other flags, another seed) must not lose what the earlier run trained. Done when the new checkpoint
    is ready to be saved, so an interrupted rerun leaves the earlier one where it was. Returns where it went."""
    checkpoint = output_dir / "checkpoint"
    if not checkpoint.exists():
        return None
    stamp = _stamp_of(checkpoint)
    label, count = stamp, 1
    while (output_dir / f"checkpoint.{label}").exists() or (
        output_dir / f"quickstart_summary.{label}.json"
    ).exists():
        count += 1
        label = f"{stamp}-{count}"
    kept = output_dir / f"checkpoint.{label}"
    checkpoint.rename(kept)
    summary = output_dir / "quickstart_summary.json"
    if summary.exists():
        summary.rename(output_dir / f"quickstart_summary.{label}.json")
    log(f"      the earlier run's checkpoint is kept in {kept}")
    return kept


# Inside the output folder: the training run's checkpoints (removed when the run has finished and saved
# `checkpoint/`) and the settings they were trained with, which `--resume` checks.
TRAINER_FOLDER = "trainer"
SETTINGS_RECORD = "quickstart_settings.json"
RESUME_COMMAND = "mmadapters quickstart --resume"


def _stamp_of(path: Path) -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))


def keep_interrupted_run(output_dir: Path, log: Any = print) -> Path | None:
    """Move an interrupted run's training checkpoints (`trainer/`) aside to `trainer.<time>/` before a new run
    trains, rather than let the new run's checkpoints replace them; returns where they went."""
    trainer_dir = output_dir / TRAINER_FOLDER
    if not any(trainer_dir.glob("checkpoint-*")):  # stopped before its first save: nothing trained to keep
        remove_training_checkpoints(output_dir)
        return None
    stamp = _stamp_of(trainer_dir)
    kept, count = output_dir / f"{TRAINER_FOLDER}.{stamp}", 1
    while kept.exists():
        count += 1
        kept = output_dir / f"{TRAINER_FOLDER}.{stamp}-{count}"
    trainer_dir.rename(kept)
    log(
        f"      an interrupted run's training checkpoints are kept in {kept} ({RESUME_COMMAND} continues a run)"
    )
    return kept


def checkpoint_to_resume(output_dir: Path, settings: QuickstartSettings) -> str:
    """The last complete training checkpoint of the interrupted run in `output_dir`, after checking that it was
    trained with these settings (a resumed run must continue the same run)."""
    from .trainers.checkpoints import find_last_checkpoint

    trainer_dir = output_dir / TRAINER_FOLDER
    checkpoint = find_last_checkpoint(trainer_dir)
    record = trainer_dir / SETTINGS_RECORD
    if checkpoint is None or not record.is_file():
        raise ValueError(
            f"Nothing to resume in {output_dir}: no complete training checkpoint in {trainer_dir} (a finished run "
            "removes its own). Run the quickstart without --resume to start over."
        )
    recorded = json.loads(record.read_text())
    changed = {
        name: (recorded.get(name), value)
        for name, value in asdict(settings).items()
        if recorded.get(name) != value
    }
    if changed:
        differences = ", ".join(f"{name} {old!r} (now {new!r})" for name, (old, new) in changed.items())
        raise ValueError(
            f"The run in {trainer_dir} was trained with other settings: {differences}. Resume with its flags, or "
            "run without --resume to start over (its checkpoints are then kept aside)."
        )
    return checkpoint


def remove_training_checkpoints(output_dir: Path) -> None:
    """After the final save: the run's training checkpoints only served to resume it."""
    import shutil

    trainer_dir = output_dir / TRAINER_FOLDER
    for path in trainer_dir.glob("checkpoint-*"):
        shutil.rmtree(path)
    (trainer_dir / SETTINGS_RECORD).unlink(missing_ok=True)
    if trainer_dir.is_dir() and not any(trainer_dir.iterdir()):
        trainer_dir.rmdir()


def run_quickstart(
    output_dir: str | os.PathLike,
    settings: QuickstartSettings | None = None,
    log: Any = print,
    resume: bool = False,
    resume_command: str | None = None,
) -> dict[str, Any]:
    """Run the quickstart; returns (and writes) the summary. `resume`: continue the interrupted run in
    `output_dir` from its last training checkpoint (same settings; the evaluations before training run again).
    `resume_command`: the command that does so, for the message of a run that stops (the CLI gives its own
    command line with --resume)."""
    import datasets

    from .checkpoint_files import ADAPTER_WEIGHTS_NAME
    from .data import load_easy_vqa
    from .evaluation import evaluate_easy_vqa, generate_answers, progress_bar
    from .hub import write_eval_results
    from .modeling.adapters import MMAdapterConfig
    from .modeling.embedded import embedded_backbones
    from .modeling.lavin import LavinForConditionalGeneration
    from .processing import LavinProcessor
    from .processing.base import question_answer_chat_template
    from .trainers import LavinTrainer, VisionLanguageCollator

    settings = settings or QuickstartSettings()
    if settings.prompt_format not in ("open", "describe"):
        raise ValueError(f"prompt_format must be 'open' or 'describe', got {settings.prompt_format!r}.")
    if not 0.0 <= settings.text_fraction < 1.0:
        raise ValueError(
            f"text_fraction is a share of the training samples in [0, 1), got {settings.text_fraction}."
        )
    if settings.text_fraction > 0 and not settings.text_answer_loss and not settings.text_distillation:
        raise ValueError(
            "The text-only samples would train nothing: without text_answer_loss give text_distillation a weight "
            "(> 0), or set text_fraction to 0."
        )
    output_dir = Path(output_dir)
    resume_from = checkpoint_to_resume(output_dir, settings) if resume else None
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # When each step began: the summary's stage_seconds (where the time goes).
    stage_starts: dict[str, float] = {}

    def step(name: str, message: str) -> None:
        stage_starts[name] = time.perf_counter()
        log(message)

    torch.manual_seed(settings.seed)

    step("backbones", "[1/6] Embedded backbones (SmolLM2-135M-Instruct + a small CLIP vision tower)...")
    text_model, vision_model = embedded_backbones()
    with no_loading_bars():
        model = LavinForConditionalGeneration.from_backbones(
            text_model,
            vision_model,
            adapter_config=MMAdapterConfig(
                vision_adapters=settings.vision_adapters,
                dropout=settings.adapter_dropout,
                placement=settings.adapter_placement,
                llm_routing=settings.llm_routing,
            ),
            vision_feature_whitening=settings.feature_whitening,
        )
        processor = LavinProcessor.from_backbones(text_model, vision_model)
    # The model learns the plain "Image: ...\nQuestion: ...\nAnswer:" layout, not the LLM's chat format: the saved
    # processor's chat template renders conversations that way, so `mmadapters chat` and the demo match training.
    processor.chat_template = question_answer_chat_template()
    if settings.feature_whitening:
        count = fit_whitening_on_easy_vqa(model, processor)
        log(f"      visual feature whitening fitted on {count:,} unlabeled easy-vqa train images")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"      LaVIN: {trainable:,} trainable of {sum(p.numel() for p in model.parameters()):,} parameters")

    step(
        "llm_text_answers",
        "[2/6] The LLM's own answers to text-only prompts (LaVIN at initialisation = the bare LLM)...",
    )
    num_samples = settings.train_steps * settings.batch_size
    num_text = int(num_samples * settings.text_fraction)
    train_prompts = [text_prompt(q) for q in training_questions()] if num_text else []
    held_out = [text_prompt(q) for q in HELD_OUT_QUESTIONS]
    llm_answers = generate_answers(
        model,
        processor,
        train_prompts + held_out,
        [None] * (len(train_prompts) + len(held_out)),
        batch_size=32,
        max_new_tokens=settings.text_max_new_tokens,
    )
    train_answers, old_answers = llm_answers[: len(train_prompts)], llm_answers[len(train_prompts) :]

    step(
        "evaluation_before",
        f"[3/6] easy-vqa accuracy before training ({settings.num_test} test questions)...",
    )
    test = load_easy_vqa("test", limit=settings.num_test, seed=settings.seed)
    bar, progress = progress_bar("      evaluating", len(test), leave=False)
    before = evaluate_easy_vqa(model, processor, test, batch_size=settings.eval_batch_size, progress=progress)
    bar.close()
    log(accuracy_line(before))

    step(
        "training",
        f"[4/6] Training {settings.train_steps} steps x {settings.batch_size} on easy-vqa"
        + (f" + {settings.text_fraction:.0%} text-only samples..." if num_text else "..."),
    )
    train = load_easy_vqa(
        "train", limit=num_samples - num_text, seed=settings.seed, prompt_format=settings.prompt_format
    )
    text_rows = [
        {
            "prompt": train_prompts[i % len(train_prompts)],
            "target": train_answers[i % len(train_prompts)],
            "image": None,
        }
        for i in range(num_text)
    ]
    rows = [{"prompt": r["prompt"], "target": r["target"], "image": r["image"]} for r in train] + text_rows
    random.Random(settings.seed).shuffle(rows)
    # Batches of similar length: the long text-only targets would otherwise pad whole batches.
    for row in rows:
        row["length"] = len(processor.tokenizer(row["prompt"] + row["target"])["input_ids"])
    trainer_dir = output_dir / TRAINER_FOLDER
    if resume_from is None:
        keep_interrupted_run(output_dir, log)
        trainer_dir.mkdir(exist_ok=True)
        (trainer_dir / SETTINGS_RECORD).write_text(json.dumps(asdict(settings), indent=2) + "\n")
    else:
        log(f"      resuming the interrupted run from {resume_from}")
    args = training_arguments(str(trainer_dir), settings)
    trainer = LavinTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        data_collator=VisionLanguageCollator(processor, supervise_text_only=settings.text_answer_loss),
        processing_class=processor,
        text_distillation=settings.text_distillation,
    )
    trainer.resume_hint = resume_command or f"{RESUME_COMMAND} (with the same flags)"
    train_output = trainer.train(resume_from_checkpoint=resume_from)
    # With bf16, accelerate wrapped the model's forward in autocast for training and leaves it so; unwrap it, so that
    # the evaluations below run in float32 like those before training (and like a reloaded checkpoint).
    model = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)

    step("evaluation_after", "[5/6] easy-vqa accuracy after training, and the held-out text-only answers...")
    bar, progress = progress_bar("      evaluating", len(test), leave=False)
    after = evaluate_easy_vqa(
        model,
        processor,
        test,
        batch_size=settings.eval_batch_size,
        progress=progress,
        answers_described=settings.prompt_format == "describe",  # same questions, scored as trained
    )
    bar.close()
    log(accuracy_line(after))
    new_answers = generate_answers(
        model,
        processor,
        held_out,
        [None] * len(held_out),
        batch_size=32,
        max_new_tokens=settings.text_max_new_tokens,
    )
    preserved = [
        first_sentence(a) == first_sentence(b) for a, b in zip(new_answers, old_answers, strict=True)
    ]
    identical = [a == b for a, b in zip(new_answers, old_answers, strict=True)]

    step("saving", "[6/6] Saving the adapter-only checkpoint...")
    checkpoint = output_dir / "checkpoint"
    keep_earlier_run(output_dir, log)
    model.save_pretrained(checkpoint, processor=processor)
    remove_training_checkpoints(output_dir)
    write_eval_results(
        str(checkpoint), f"easy-vqa test ({settings.prompt_format} answers)", after, "mmadapters quickstart"
    )
    bounds = [*stage_starts.values(), time.perf_counter()]
    stage_seconds = {
        name: round(end - begin, 1)
        for name, begin, end in zip(stage_starts, bounds[:-1], bounds[1:], strict=True)
    }
    summary = {
        "accuracy_before": round(before["accuracy"], 4),
        "accuracy_after": round(after["accuracy"], 4),
        "accuracy_after_by_type": {k: round(v, 4) for k, v in after["by_group"].items()},
        "unparsed_after": after["unparsed"],
        "num_test_questions": after["count"],
        "text_only_preserved": round(sum(preserved) / len(preserved), 4),
        "text_only_identical": round(sum(identical) / len(identical), 4),
        "num_text_prompts_checked": len(preserved),
        "text_only_answers": [
            {"prompt": q, "llm": b, "lavin": a}
            for q, a, b in zip(HELD_OUT_QUESTIONS, new_answers, old_answers, strict=True)
        ],
        "train_loss": round(train_output.training_loss, 4),
        "resumed_from": resume_from,
        "trainable_parameters": trainable,
        "adapter_bytes": (checkpoint / ADAPTER_WEIGHTS_NAME).stat().st_size,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "stage_seconds": stage_seconds,
        "checkpoint_dir": str(checkpoint),
        "settings": asdict(settings),
    }
    (output_dir / "quickstart_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
