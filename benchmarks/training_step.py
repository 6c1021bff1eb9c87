"""Training step time and peak memory: LaVIN adapters (float32 and bfloat16 mixed precision) vs LaVIN + LoRA on
top vs PEFT LoRA (r = 8 on q/v) vs full fine-tuning of the LLM.

Same model (LaVIN on the embedded backbones), same easy-vqa batch, same optimizer (AdamW); only the trainable
set differs. "+sup" rows compute logits only at supervised positions, as our Trainers do (the same loss); a
LoRA run through the same forward can use it too, so it is shown for both. Each method runs in its own subprocess (peak memory = the process's peak resident set size,
measured after loading, so that the three numbers are comparable); step times are medians.

    python benchmarks/training_step.py [--steps 8] [--batch-size 8] [--rounds 3] [--methods lavin+sup ...]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

# "+sup": the forward computes logits only at supervised positions (`supervised_logits_only=True`, what
# LavinTrainer/CromeTrainer pass in training steps); the others compute them everywhere (a plain HF forward).
# "lavin+lora": LaVIN's adapters and a LoRA r = 8 on the LLM's q/v training together (`mmadapters.add_lora`).
# "+bf16": the step under bfloat16 autocast, as `TrainingArguments(bf16=True)` runs it (the quickstart's default
# where the CPU computes bfloat16 natively: mmadapters.precision; weights and optimizer stay float32).
METHODS = ("lavin", "lavin+sup", "lavin+sup+bf16", "lavin+lora+sup", "lora", "lora+sup", "full")


def run_method(method: str, steps: int, batch_size: int) -> dict:
    import torch

    import mmadapters
    from mmadapters import LavinForConditionalGeneration, LavinProcessor
    from mmadapters.data import load_easy_vqa
    from mmadapters.trainers import VisionLanguageCollator

    torch.manual_seed(0)
    text_model, vision_model = mmadapters.embedded_backbones()
    model = LavinForConditionalGeneration.from_backbones(text_model, vision_model)
    processor = LavinProcessor.from_backbones(text_model, vision_model)
    name = method
    bf16 = method.endswith("+bf16")
    method = method.removesuffix("+bf16")
    supervised_only = method.endswith("+sup")
    method = method.removesuffix("+sup")
    if method == "lavin+lora":
        from peft import LoraConfig

        mmadapters.add_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        for parameter in model.parameters():
            parameter.requires_grad_(False)
        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, target_modules=r".*language_model.*\.(q_proj|v_proj)")
        )
    elif method == "full":
        for parameter in model.language_model.parameters():
            parameter.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    rows = load_easy_vqa("train", limit=batch_size * (steps + 1), seed=0)
    collator = VisionLanguageCollator(processor)
    batches = [
        collator([rows[i] for i in range(s * batch_size, (s + 1) * batch_size)]) for s in range(steps + 1)
    ]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model.train()
    times = []
    for batch in batches:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch, supervised_logits_only=supervised_only).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {
        "method": name,
        "trainable": sum(p.numel() for p in trainable),
        "step_seconds": statistics.median(times[1:]),  # the first step warms up
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_load_mb": rss_before / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS), help="rows to measure"
    )
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # one subprocess per method
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_method(args.method, args.steps, args.batch_size)))
        return
    # Rounds of one subprocess per method, interleaved, so that the shared machine's slow phases hit every
    # method alike; the figures are medians over rounds.
    runs: dict[str, list[dict]] = {method: [] for method in args.methods}
    for _ in range(args.rounds):
        for method in args.methods:
            command = [sys.executable, __file__, "--method", method, "--steps", str(args.steps)]
            command += ["--batch-size", str(args.batch_size)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            runs[method].append(json.loads(output.strip().splitlines()[-1]))
    results = {
        method: {
            "trainable": rounds[0]["trainable"],
            "step_seconds": statistics.median(r["step_seconds"] for r in rounds),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rounds),
        }
        for method, rounds in runs.items()
    }
    lavin = results[
        "lavin+sup" if "lavin+sup" in results else args.methods[0]
    ]  # LaVIN as LavinTrainer runs it
    print(
        f"batch {args.batch_size} easy-vqa samples, {args.steps} steps per run, {args.rounds} interleaved rounds, "
        "medians; peak = process peak RSS"
    )
    print(
        "| method | trainable | step s | LaVIN+sup / method step time | peak RSS MB | LaVIN+sup / method peak |"
    )
    print("|---|---|---|---|---|---|")
    for method in args.methods:
        r = results[method]
        print(
            f"| {method} | {r['trainable']:,} | {r['step_seconds']:.2f} | {lavin['step_seconds'] / r['step_seconds']:.2f} "
            f"| {r['peak_rss_mb']:.0f} | {lavin['peak_rss_mb'] / r['peak_rss_mb']:.2f} |"
        )


if __name__ == "__main__":
    from mmadapters.library_logs import quiet_library_logs

    quiet_library_logs()
    main()
