"""`mmadapters <command>`: the command-line entry point."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

QUICKSTART_TEXT_PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "How many sides does a triangle have?",
    "What is 2 + 3?",
]


def _easy_vqa_sample() -> tuple[str, str, str] | None:
    """(image path, question, answer) of the first easy-vqa test question, if the data set is installed."""
    try:
        import easy_vqa
    except ImportError:
        return None
    questions, answers, image_ids = easy_vqa.get_test_questions()
    return easy_vqa.get_test_image_paths()[image_ids[0]], questions[0], answers[0]


def quickstart(output_dir: str) -> dict:
    """End-to-end run on the embedded backbones: build LaVIN, answer text and image questions, check that the
    text-only answers equal the base LLM's (the adapters start as the identity), save an adapter-only
    checkpoint, reload it through the Auto classes and check identical logits."""
    import torch
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from . import LavinForConditionalGeneration, LavinProcessor, embedded_backbones

    start = time.perf_counter()
    torch.manual_seed(0)
    print("[1/5] Setting up the embedded backbones (SmolLM2-135M-Instruct + a small CLIP vision tower)...")
    text_model, vision_model = embedded_backbones()
    print(f"      LLM: {text_model}\n      vision: {vision_model}")
    print("[2/5] Building LaVIN around them...")
    model = LavinForConditionalGeneration.from_backbones(text_model, vision_model).eval()
    processor = LavinProcessor.from_backbones(text_model, vision_model)
    base = AutoModelForCausalLM.from_pretrained(text_model, dtype=torch.float32).eval()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"      trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

    print("[3/5] Text-only questions: LaVIN at initialisation vs. the bare LLM...")
    preserved = 0
    for question in QUICKSTART_TEXT_PROMPTS:
        chat = [{"role": "user", "content": [{"type": "text", "text": question}]}]
        inputs = processor(text=processor.apply_chat_template(chat, add_generation_prompt=True))
        length = inputs["input_ids"].shape[1]
        ours = model.generate(**inputs, max_new_tokens=24, do_sample=False)[0, length:]
        theirs = base.generate(**inputs, max_new_tokens=24, do_sample=False)[0, length:]
        preserved += ours.tolist() == theirs.tolist()
        print(f"      Q: {question}\n      A: {processor.decode(ours, skip_special_tokens=True).strip()}")

    print("[4/5] An image question (the adapters are untrained: expect a fluent but uninformed answer)...")
    sample = _easy_vqa_sample()
    if sample is None:
        image, question, answer = Image.new("RGB", (64, 64), (255, 0, 0)), "What color is the image?", "red"
    else:
        image, question, answer = sample
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    inputs = processor(images=[image], text=processor.apply_chat_template(chat, add_generation_prompt=True))
    generated = model.generate(**inputs, max_new_tokens=16, do_sample=False)[
        0, inputs["input_ids"].shape[1] :
    ]
    print(
        f"      Q: {question} (reference: {answer})\n      A: {processor.decode(generated, skip_special_tokens=True)}"
    )

    print("[5/5] Saving the adapter-only checkpoint and reloading it...")
    checkpoint = Path(output_dir) / "checkpoint"
    model.save_pretrained(checkpoint, processor=processor)
    reloaded = AutoModelForImageTextToText.from_pretrained(checkpoint)
    with torch.no_grad():
        same = torch.equal(reloaded(**inputs).logits, model(**inputs).logits)
    if not same:
        raise RuntimeError("The reloaded checkpoint does not reproduce the model's logits.")
    summary = {
        "trainable_parameters": trainable,
        "total_parameters": total,
        "adapter_bytes": (checkpoint / "adapter_model.safetensors").stat().st_size,
        "text_only_preserved": preserved / len(QUICKSTART_TEXT_PROMPTS),
        "num_text_prompts": len(QUICKSTART_TEXT_PROMPTS),
        "reload_identical_logits": same,
        "checkpoint_dir": str(checkpoint),
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    (Path(output_dir) / "quickstart_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


def convert_instructblip(instructblip: str, llm: str, output_dir: str) -> None:
    """Initialise CROME around `llm` from an InstructBLIP checkpoint and save it (adapter-only)."""
    from .convert import from_instructblip

    model, processor = from_instructblip(instructblip, text_model=llm)
    model.save_pretrained(output_dir, processor=processor)
    taken = ", ".join(model.config.qformer_source["modules"])
    print(f"CROME initialised from {instructblip} ({taken}) around {llm}; saved to {output_dir}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmadapters", description="Multimodal adapters for Hugging Face models."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    quick = commands.add_parser("quickstart", help="end-to-end run on the embedded backbones (offline)")
    quick.add_argument(
        "--output-dir", default="quickstart_output", help="where the checkpoint and summary go"
    )
    convert = commands.add_parser(
        "convert-instructblip", help="initialise CROME from an InstructBLIP checkpoint (Hub id or folder)"
    )
    convert.add_argument("instructblip", help="InstructBLIP checkpoint: Hub id or local folder")
    convert.add_argument("output_dir", help="where the CROME checkpoint goes")
    convert.add_argument("--llm", required=True, help="the LLM to put CROME around: Hub id or local folder")
    args = parser.parse_args(argv)

    if args.command == "quickstart":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        quickstart(args.output_dir)
    elif args.command == "convert-instructblip":
        convert_instructblip(args.instructblip, args.llm, args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
