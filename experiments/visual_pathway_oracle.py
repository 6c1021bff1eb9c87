"""Is the quickstart limited by LaVIN's visual pathway or by the random embedded vision tower?

Both runs train LaVIN on easy-vqa *colour* questions only (the question alone cannot answer them: chance is
1/6), with the quickstart's optimiser settings, and evaluate on 200 colour test questions:
- "tower": the real visual path (embedded random tower -> CLS after layers 4/8/12 -> projector);
- "oracle": the tower's features are replaced by an informative one computed from the pixels (the mean colour of
  the pixels that differ from the image's corner, through a fixed random 3 -> 192 map), then the same projector,
  LLM and adapters.
If the oracle learns and the tower does not, the LLM side (projector, LLM adapters, routing) works and the random
tower's features are the limit.

    python experiments/visual_pathway_oracle.py [--steps 60]
"""

from __future__ import annotations

import argparse

import datasets
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import mmadapters
from mmadapters import LavinForConditionalGeneration, LavinProcessor
from mmadapters.data import load_easy_vqa
from mmadapters.evaluation import evaluate_easy_vqa
from mmadapters.quickstart import QuickstartSettings, training_arguments
from mmadapters.trainers import LavinTrainer, VisionLanguageCollator


def shape_mask_and_colour(pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The shape's pixels (those that differ from the image's corner), (images, H, W), and their mean colour,
    (images, 3)."""
    x = pixel_values.float()
    mask = ((x - x[:, :, :1, :1]).abs().sum(1) > 0.3).float()
    colour = (x * mask[:, None]).sum((2, 3)) / mask.sum((1, 2)).clamp(min=1)[:, None]
    return mask, colour


def oracle_image_features(model: LavinForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    projection = torch.randn(
        3, model.config.vision_config.hidden_size, generator=torch.Generator().manual_seed(0)
    )
    _, colour = shape_mask_and_colour(pixel_values)
    features = (colour @ projection)[:, None].expand(-1, model.config.num_image_tokens, -1)
    return model.projector(features)


def run(variant: str, steps: int) -> float:
    text_model, vision_model = mmadapters.embedded_backbones()
    torch.manual_seed(0)
    model = LavinForConditionalGeneration.from_backbones(text_model, vision_model)
    processor = LavinProcessor.from_backbones(text_model, vision_model)
    if variant == "oracle":
        model.get_image_features = lambda pixel_values, **kwargs: BaseModelOutputWithPooling(
            pooler_output=oracle_image_features(model, pixel_values)
        )
    colour = lambda row: row["question_type"] == "color"  # noqa: E731
    train = load_easy_vqa("train", limit=20000, seed=0).filter(colour).select(range(steps * 32))
    test = load_easy_vqa("test", limit=3000, seed=0).filter(colour).select(range(200))
    rows = [{"prompt": r["prompt"], "target": r["target"], "image": r["image"]} for r in train]
    # The quickstart's optimiser settings; random batches (these rows carry no length column).
    args = training_arguments(
        f"/tmp/visual_pathway_{variant}",
        QuickstartSettings(train_steps=steps),
        train_sampling_strategy="random",
        disable_tqdm=True,
        logging_steps=steps,
        seed=42,  # the seed the recorded figures were measured with
    )
    trainer = LavinTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        data_collator=VisionLanguageCollator(processor),
        processing_class=processor,
    )
    trainer.train()
    return evaluate_easy_vqa(model, processor, test, batch_size=64)["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    results = {variant: run(variant, args.steps) for variant in ("tower", "oracle")}
    print(f"colour questions only, {args.steps} steps x 32, 200 test questions (chance 1/6):")
    for variant, accuracy in results.items():
        print(f"  {variant:<7} accuracy {accuracy:.3f}")


if __name__ == "__main__":
    from mmadapters.library_logs import quiet_library_logs

    quiet_library_logs()
    main()
