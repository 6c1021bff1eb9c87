"""The GPU check: LaVIN around a LLaMA-7B-shaped LLM and a ViT-L/14 tower, in bf16 and with a 4-bit LLM.

    python benchmarks/gpu_check.py                      # full size, on an NVIDIA GPU (under 8 minutes on an H200)
    python benchmarks/gpu_check.py --size tiny --device cpu   # the same code at tiny size (run by the test suite)

What it reports (JSON on stdout, one object per measurement, and a summary table):
- training step time and peak memory: LaVIN (frozen bf16 LLM + tower, fp32 adapters) vs PEFT LoRA r=8 on the same
  LLM alone vs full fine-tuning of the LLM (skipped when it does not fit);
- generation tokens/s: LaVIN (text-only, folded adapters) vs the bare LLM, greedy, same prompt;
- LaVIN with a bitsandbytes nf4 LLM (LaVIN-lite): load, train step, generation;
- sdpa vs flash_attention_2 for LaVIN's training step, where flash-attn is installed;
- inference as `mmadapters eval` / `chat` / the demo run it with `--device-map cuda`: the same answers as on CPU.

Backbones have random weights (no Hub access on the machines it runs on): speed and memory do not depend on the
values. The 4-bit run needs weights to quantise, so the random LLM is saved once to --workdir first.
Device maps: every model is loaded with device_map="auto" (one GPU: everything on it; several: split by layer).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any

import torch
from transformers import AutoModelForCausalLM, CLIPVisionConfig, LlamaConfig

from mmadapters import LavinForConditionalGeneration
from mmadapters.modeling.paper_configs import LLAMA_7B, VIT_L14

SIZES = {
    # LLaMA-7B and CLIP ViT-L/14 at 224 px (LAVIN.md).
    "full": dict(
        text=LLAMA_7B,
        vision=VIT_L14,
        batch=4,
        seq=256,
        new_tokens=64,
    ),
    "tiny": dict(
        text=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=300
        ),
        vision=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        batch=2,
        seq=16,
        new_tokens=4,
    ),
}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def batch_for(model: torch.nn.Module, size: dict, device: str, with_image: bool) -> dict[str, torch.Tensor]:
    """Random token ids (image placeholders first when `with_image`), labels on the second half."""
    generator = torch.Generator().manual_seed(0)
    batch, seq, vocab = size["batch"], size["seq"], size["text"]["vocab_size"]
    ids = torch.randint(3, vocab, (batch, seq), generator=generator)
    inputs: dict[str, Any] = {}
    if with_image:
        image_tokens = model.config.num_image_tokens
        ids[:, :image_tokens] = model.config.image_token_id
        pixels = size["vision"]["image_size"]
        inputs["pixel_values"] = torch.randn(batch, 3, pixels, pixels, generator=generator).to(device)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    labels[labels == getattr(model.config, "image_token_id", -1)] = -100
    inputs.update(
        input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), labels=labels.to(device)
    )
    return inputs


def time_training(model: torch.nn.Module, inputs: dict, device: str, steps: int) -> dict[str, Any]:
    """Mean time of a forward + backward + AdamW step over the trainable parameters (after one warm-up step)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    model.train()
    reset_peak(device)
    times = []
    for step in range(steps + 1):
        synchronize(device)
        start = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step:
            times.append(time.perf_counter() - start)
    return {
        "step_s": round(sum(times) / len(times), 4),
        "peak_gib": peak_gib(device),
        "trainable": sum(p.numel() for p in parameters),
        "loss": round(loss.detach().item(), 4),
    }


@torch.no_grad()
def tokens_per_second(model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int, device: str) -> float:
    model.eval()
    kwargs = dict(
        attention_mask=torch.ones_like(input_ids),
        pad_token_id=0,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
    )
    model.generate(input_ids=input_ids, **kwargs)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    model.generate(input_ids=input_ids, **kwargs)
    synchronize(device)
    return round(input_ids.shape[0] * new_tokens / (time.perf_counter() - start), 1)


def report(results: list[dict], **entry: Any) -> None:
    results.append(entry)
    print(json.dumps(entry), flush=True)


def run(size_name: str, device: str, workdir: str, steps: int) -> list[dict]:
    size = SIZES[size_name]
    dtype = torch.bfloat16
    device_map = "auto" if device.startswith("cuda") else device
    text_config = LlamaConfig(
        **size["text"], num_key_value_heads=size["text"]["num_attention_heads"], dtype=dtype
    )
    vision_config = CLIPVisionConfig(**size["vision"])
    results: list[dict] = []

    # The random LLM, saved once: the quantised run and the LoRA / full fine-tuning baselines load it by path.
    llm_path = os.path.join(workdir, f"llama-{size_name}")
    if not os.path.isfile(os.path.join(llm_path, "config.json")):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(text_config, dtype=dtype).save_pretrained(llm_path)

    # 1. LaVIN, bf16 backbones, device_map="auto".
    lavin = LavinForConditionalGeneration.from_backbones(
        llm_path, vision_config, dtype=dtype, device_map=device_map, attn_implementation="sdpa"
    )
    image_batch = batch_for(lavin, size, device, with_image=True)
    report(results, run="lavin_bf16_train", **time_training(lavin, image_batch, device, steps))
    prompt = image_batch["input_ids"][:, size["vision"]["num_hidden_layers"] // 4 + 1 :][:, :32]  # text only
    report(
        results,
        run="lavin_bf16_generate",
        tokens_per_s=tokens_per_second(lavin, prompt, size["new_tokens"], device),
    )
    del lavin

    # 2. The bare LLM: generation, PEFT LoRA r=8 training, full fine-tuning where it fits.
    from peft import LoraConfig, get_peft_model

    bare = AutoModelForCausalLM.from_pretrained(llm_path, dtype=dtype, device_map=device_map)
    report(
        results,
        run="bare_llm_generate",
        tokens_per_s=tokens_per_second(bare, prompt, size["new_tokens"], device),
    )
    text_batch = {k: v for k, v in image_batch.items() if k != "pixel_values"}
    text_batch["input_ids"] = text_batch["input_ids"].clamp_min(3).clamp_max(size["text"]["vocab_size"] - 1)
    lora = get_peft_model(bare, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    report(results, run="peft_lora_r8_train", **time_training(lora, text_batch, device, steps))
    del lora, bare
    try:
        full = AutoModelForCausalLM.from_pretrained(llm_path, dtype=dtype, device_map=device_map)
        report(results, run="full_finetune_train", **time_training(full, text_batch, device, steps))
        del full
    except torch.OutOfMemoryError:
        report(results, run="full_finetune_train", skipped="out of memory")
    reset_peak(device)

    # 3. LaVIN-lite: the LLM quantised to 4-bit nf4 (bitsandbytes), adapters in float32.
    try:
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        lite = LavinForConditionalGeneration.from_backbones(
            llm_path,
            vision_config,
            dtype=dtype,
            device_map=device_map,
            quantization_config={"text_config": quantization},
        )
        report(results, run="lavin_lite_4bit_train", **time_training(lite, image_batch, device, steps))
        report(
            results,
            run="lavin_lite_4bit_generate",
            tokens_per_s=tokens_per_second(lite, prompt, size["new_tokens"], device),
        )
        del lite
    except (ImportError, RuntimeError) as error:
        report(results, run="lavin_lite_4bit", skipped=f"{type(error).__name__}: {str(error)[:200]}")

    # 4. flash attention, where installed.
    import importlib.util

    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        flash = LavinForConditionalGeneration.from_backbones(
            llm_path,
            vision_config,
            dtype=dtype,
            device_map=device_map,
            attn_implementation="flash_attention_2",
        )
        report(
            results,
            run="lavin_bf16_train_flash_attention_2",
            **time_training(flash, image_batch, device, steps),
        )
    else:
        report(results, run="lavin_bf16_train_flash_attention_2", skipped="flash-attn not installed")

    # 5. Inference as `mmadapters eval` / `chat`, the demo and lmms-eval run it on a GPU (`--device-map cuda`).
    report(results, run="inference_on_device", **inference_on_device(workdir, device))
    return results


def inference_on_device(workdir: str, device: str) -> dict[str, Any]:
    """An adapter-only checkpoint around the embedded backbones (the real SmolLM2: a tokenizer, and answers in
    words), loaded with `load_for_inference` on CPU and onto `device`; greedy answers through `generate_answers`,
    whose inputs must follow the model to the device. Untrained adapters: the answers are the LLM's."""
    from PIL import Image

    from mmadapters import LavinProcessor, embedded_backbones
    from mmadapters.evaluation import generate_answers
    from mmadapters.inference_loading import load_for_inference

    text_model, vision_model = embedded_backbones()
    folder = os.path.join(workdir, "embedded-lavin")
    processor = LavinProcessor.from_backbones(text_model, vision_model)
    LavinForConditionalGeneration.from_backbones(text_model, vision_model).save_pretrained(
        folder, processor=processor
    )
    prompts = ["Image: <image>\nWhat color is the shape?", "Image: N/A\nWhat is the capital of France?"]
    images = [Image.new("RGB", (64, 64), "red"), None]
    answers = {}
    for where in ("cpu", device):
        model, processor = load_for_inference(folder, "float32", where)
        answers[where] = generate_answers(model, processor, prompts, images, batch_size=2, max_new_tokens=8)
        del model
    return {"answers": answers[device], "same_as_cpu": answers[device] == answers["cpu"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--workdir", default=None, help="where the random LLM is saved (default: a temporary folder)"
    )
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per run")
    args = parser.parse_args()
    if args.size == "full" and not args.device.startswith("cuda"):
        parser.error("--size full needs a GPU; use --size tiny --device cpu to check the script itself.")
    with tempfile.TemporaryDirectory() as scratch:
        results = run(args.size, args.device, args.workdir or scratch, args.steps)
    print("\n| run | step s | peak GiB | trainable | tokens/s |\n|---|---|---|---|---|")
    for entry in results:
        print(
            f"| {entry['run']} | {entry.get('step_s', '')} | {entry.get('peak_gib', '')} | "
            f"{entry.get('trainable', '')} | {entry.get('tokens_per_s', entry.get('skipped', ''))} |"
        )


if __name__ == "__main__":
    from mmadapters.library_logs import quiet_library_logs

    quiet_library_logs()
    main()
