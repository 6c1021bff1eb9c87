"""Why `vision_feature_whitening` exists: the embedded random tower's features hold the image's colour and
shape, but not in a form gradient descent reads within the quickstart's budget.

The frozen embedded tower (LaVIN's own, vision adapters at initialisation) turns each easy-vqa image into the
features LaVIN reads: the CLS token after layers 4, 8 and 12. A projector-sized MLP (Linear -> SiLU -> Linear,
128 hidden, Adam 3e-3, batches of 32 images; `vision_tower_probe.probe`) learns the image's colour (8 classes)
and shape (3 classes) from them, with labels read off each image's own questions (`image_descriptions`), tested
on the test images. Three
forms of the same features: raw (what LaVIN's projector gets by default), standardised per dimension, and
whitened per layer by LaVIN's `feature_whitening`, fitted on the 4,000 train images as the quickstart does.
Budgets: 100 steps and 10 epochs.

    python experiments/feature_whitening.py
"""

from __future__ import annotations

import time

import easy_vqa
import torch
from torch import nn
from vision_tower_probe import probe

import mmadapters
from mmadapters import LavinForConditionalGeneration, LavinProcessor
from mmadapters.data.easy_vqa import COLORS, SHAPES, image_descriptions
from mmadapters.quickstart import fit_whitening_on_easy_vqa


def split_features(model, processor, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features (images, layers, width), colour and shape labels of the images whose questions reveal both."""
    questions = easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    descriptions = image_descriptions(*questions)
    image_ids = sorted(descriptions)
    features = []
    with torch.no_grad():
        for start in range(0, len(image_ids), 250):
            pixels = processor._pixel_values([paths[i] for i in image_ids[start : start + 250]])
            features.append(model.pooled_vision_features(pixels).float())
    colours = torch.tensor([COLORS.index(descriptions[i].split()[0]) for i in image_ids])
    shapes = torch.tensor([SHAPES.index(descriptions[i].split()[1]) for i in image_ids])
    return torch.cat(features), colours, shapes


def main() -> None:
    torch.manual_seed(0)
    text_model, vision_model = mmadapters.embedded_backbones()
    model = LavinForConditionalGeneration.from_backbones(
        text_model, vision_model, vision_feature_whitening=True
    ).eval()
    processor = LavinProcessor.from_backbones(text_model, vision_model)
    train_f, train_colour, train_shape = split_features(model, processor, "train")
    test_f, test_colour, test_shape = split_features(model, processor, "test")
    print(f"{len(train_f)} train / {len(test_f)} test images (those whose questions reveal colour and shape)")
    image_dependent = (train_f.std(dim=0).norm() / train_f.mean(dim=0).norm()).item()
    spectrum = torch.linalg.eigvalsh(torch.cov(train_f[:, -1].double().T))
    print(
        f"image-dependent part of the features: {image_dependent:.1%} of their mean's norm; variances of the "
        f"last feature layer span {spectrum.max() / spectrum.clamp_min(1e-30).min():.1e}x"
    )

    fit_whitening_on_easy_vqa(model, processor)  # on all 4,000 train images, as the quickstart does
    whitening = model.feature_whitening
    mean, std = train_f.mean(dim=0), train_f.std(dim=0) + 1e-6
    forms = {
        "raw": (train_f, test_f),
        "standardised per dimension": ((train_f - mean) / std, (test_f - mean) / std),
        "whitened per layer": (whitening(train_f), whitening(test_f)),
    }
    epochs = 10 * len(train_f) // 32
    print(f"{'features':<36} {'colour@100':>10} {'shape@100':>10} {'colour@10ep':>11} {'shape@10ep':>11}")
    for name, (train_x, test_x) in forms.items():
        start = time.perf_counter()
        train_x, test_x = train_x.flatten(1), test_x.flatten(1)
        scores = [
            probe(train_x, train_y, test_x, test_y, steps, hidden=128, activation=nn.SiLU)
            for steps in (100, epochs)
            for train_y, test_y in ((train_colour, test_colour), (train_shape, test_shape))
        ]
        print(
            f"{name:<36} {scores[0]:>10.3f} {scores[1]:>10.3f} {scores[2]:>11.3f} {scores[3]:>11.3f}"
            f"   ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    from mmadapters.library_logs import quiet_library_logs

    quiet_library_logs()
    main()
