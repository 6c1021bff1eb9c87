"""Memory of the DPO / KTO / RLOO / GRPO reference model: a separate copy (what TRL loads) vs the model itself with
its starting trainable weights (what our Trainers give TRL, `mmadapters/trainers/reference.py`), at the paper's sizes.

Built on the meta device (instant, no weights): the bytes are the tensors' sizes, backbones in bfloat16 as a 7B
model is trained on a GPU, our modules in the dtype `from_backbones` gives them.

    python benchmarks/preference_reference_memory.py
"""

from __future__ import annotations

import torch


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    # imported here, after quiet_library_logs: the trainers import transformers' Trainer (and so bitsandbytes)
    from mmadapters import LavinForConditionalGeneration
    from mmadapters.modeling.paper_configs import llama_7b_config, llama_13b_config, vit_l14_config
    from mmadapters.trainers.reference import InitialWeightsReference

    print("| LaVIN around | separate reference (TRL) | shared reference (ours) | ratio |")
    print("|---|---|---|---|")
    for name, text_config in (
        ("LLaMA-7B + ViT-L/14", llama_7b_config()),
        ("LLaMA-13B + ViT-L/14", llama_13b_config()),
    ):
        with torch.device("meta"):
            model = LavinForConditionalGeneration.from_backbones(
                text_config, vit_l14_config(), dtype=torch.bfloat16
            )
            reference = InitialWeightsReference(model)
        separate = tensor_bytes([*model.parameters(), *model.buffers()])
        shared = tensor_bytes(initial for _, initial in reference._initial)
        print(
            f"| {name} | {separate / 2**30:.2f} GiB | {shared / 2**20:.1f} MiB | {separate / shared:,.0f}x |"
        )


if __name__ == "__main__":
    from mmadapters.library_logs import quiet_library_logs

    quiet_library_logs()
    main()
