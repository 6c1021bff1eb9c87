"""Trainable parameters and adapter file size of LaVIN at the paper's sizes (LAVIN.md section 5).

Built on the meta device (instant, no weights); the adapter file is written with zero tensors of the
adapter shapes in float32, exactly as `save_pretrained` writes real ones.

    python benchmarks/parameter_counts.py
"""

from __future__ import annotations

import os
import tempfile

import torch
from safetensors.torch import save_file

from mmadapters import LavinForConditionalGeneration, MMAdapterConfig
from mmadapters.modeling.paper_configs import llama_7b_config, llama_13b_config, vit_l14_config

PAPER = {"LLaMA-7B": ("3.8M", "about 15 MB"), "LLaMA-13B": ("5.4M", "-")}
SHAPES = {
    "LLaMA-7B": (llama_7b_config(), 10.0),
    "LLaMA-13B": (llama_13b_config(), 5.0),
}
VIT_L14 = vit_l14_config()


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def adapter_file_bytes(model: LavinForConditionalGeneration) -> int:
    zeros = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in model.adapter_state_dict().items()}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "mmadapters_model.safetensors")
        save_file(zeros, path, metadata={"format": "pt"})
        return os.path.getsize(path)


def main() -> None:
    print(
        "| backbone (+ ViT-L/14) | LLM adapters | ViT adapters | projector | modality emb. | total trainable "
        "| paper | adapter file (fp32) | paper |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (text_config, temperature) in SHAPES.items():
        with torch.device("meta"):
            model = LavinForConditionalGeneration.from_backbones(
                text_config, VIT_L14, adapter_config=MMAdapterConfig(temperature=temperature)
            )
        size = adapter_file_bytes(model)
        print(
            f"| {name} | {count(model.llm_adapters):,} | {count(model.vision_adapters):,} | {count(model.projector):,} "
            f"| {count(model.modality_embedding):,} | {count(model):,} | {PAPER[name][0]} | {size / 1e6:.1f} MB "
            f"| {PAPER[name][1]} |"
        )


if __name__ == "__main__":
    from mmadapters.library_logs import quiet_library_logs

    quiet_library_logs()
    main()
