"""The quickstart with a perfect vision feature: how far LaVIN's LLM side gets within the quickstart's budget
when the image's colour and shape are handed to it cleanly.

The tower's features are replaced by [mean colour of the pixels that differ from the corner ; one-hot shape
from how much of its bounding box the shape fills (rectangle ~1, circle ~0.79, triangle ~0.5)] through a fixed
random map, then LaVIN's own projector, LLM adapters and routing; everything else is `mmadapters quickstart`
with the plain recipe (answer-word targets, no whitening, vision adapters on: its default when this was recorded).

    python experiments/perfect_feature_quickstart.py [--train-steps 100] [--num-test 300]
"""

from __future__ import annotations

import argparse

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from visual_pathway_oracle import shape_mask_and_colour

from mmadapters.modeling.lavin import LavinForConditionalGeneration
from mmadapters.quickstart import QuickstartSettings, run_quickstart

PROJECTION = torch.randn(6, 192, generator=torch.Generator().manual_seed(0))


def perfect_image_features(
    self: LavinForConditionalGeneration, pixel_values: torch.Tensor, **kwargs: object
) -> BaseModelOutputWithPooling:
    mask, colour = shape_mask_and_colour(pixel_values)
    shapes = []
    for image_mask in mask:
        ys, xs = torch.nonzero(image_mask, as_tuple=True)
        box = ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)).item() if len(ys) else 1
        fill = image_mask.sum().item() / box
        shapes.append(0 if fill > 0.9 else 1 if fill > 0.65 else 2)
    shape = torch.nn.functional.one_hot(torch.tensor(shapes), 3).float() * 3
    features = (torch.cat([colour, shape], -1) @ PROJECTION)[:, None].expand(
        -1, self.config.num_image_tokens, -1
    )
    return BaseModelOutputWithPooling(pooler_output=self.projector(features))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument("--num-test", type=int, default=300)
    args = parser.parse_args()
    LavinForConditionalGeneration.get_image_features = perfect_image_features
    settings = QuickstartSettings(  # the plain recipe these figures were recorded with
        train_steps=args.train_steps,
        num_test=args.num_test,
        prompt_format="open",
        feature_whitening=False,
        vision_adapters=True,
    )
    summary = run_quickstart("/tmp/perfect_feature_quickstart", settings, log=lambda *a: None)
    print(
        f"perfect feature, {args.train_steps} steps, {args.num_test} test questions: accuracy before "
        f"{summary['accuracy_before']:.3f}, after {summary['accuracy_after']:.3f}, by type "
        f"{summary['accuracy_after_by_type']}"
    )


if __name__ == "__main__":
    from mmadapters.library_logs import quiet_library_logs

    quiet_library_logs()
    main()
