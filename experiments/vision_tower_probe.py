"""How much easy-vqa information the frozen features of a seeded random vision tower carry (the embedded default
tower is random: no pretrained tower is available offline).

For each candidate tower recipe, the frozen tower (no adapters) turns every easy-vqa image into the features
LaVIN would read (the pooled tokens after the configured layers, standardised per dimension with training-set
statistics); a small MLP on [features ; bag-of-words of the question] is trained to pick the answer, with the
quickstart's budget (100 steps x 32 questions) and with a long budget (10 epochs). Test accuracy on 2,000 test
questions measures the recipe, not LaVIN.

    python experiments/vision_tower_probe.py
"""

from __future__ import annotations

import argparse
import re
import time

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

RECIPES = {
    "v1: 12 layers, patch 8, CLS at 4/8/12": dict(layers=12, patch=8, pooling="cls", factor=1.0),
    "mean pooling at 4/8/12": dict(layers=12, patch=8, pooling="mean", factor=1.0),
    "init factor 5, CLS": dict(layers=12, patch=8, pooling="cls", factor=5.0),
    "init factor 5, mean": dict(layers=12, patch=8, pooling="mean", factor=5.0),
    "patch 4, CLS": dict(layers=12, patch=4, pooling="cls", factor=1.0),
    "6 layers, CLS at 2/4/6": dict(layers=6, patch=8, pooling="cls", factor=1.0, every=2),
}


def build_tower(layers: int, patch: int, factor: float, seed: int = 0) -> CLIPVisionModel:
    config = CLIPVisionConfig(
        hidden_size=192,
        intermediate_size=768,
        num_hidden_layers=layers,
        num_attention_heads=3,
        image_size=64,
        patch_size=patch,
        projection_dim=192,
        initializer_factor=factor,
    )
    torch.manual_seed(seed)
    return CLIPVisionModel(config).eval()


def pixel_values(paths: list[str]) -> torch.Tensor:
    arrays = [(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255 - MEAN) / STD for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


@torch.no_grad()
def features(tower: CLIPVisionModel, pixels: torch.Tensor, pooling: str, every: int) -> torch.Tensor:
    out = []
    for start in range(0, len(pixels), 250):
        states = tower(pixel_values=pixels[start : start + 250], output_hidden_states=True).hidden_states
        layers = range(every, len(states), every)
        pooled = [states[k][:, 0] if pooling == "cls" else states[k].mean(dim=1) for k in layers]
        out.append(torch.cat(pooled, dim=-1))
    return torch.cat(out)


def bag_of_words(questions: list[str], vocab: dict[str, int]) -> torch.Tensor:
    bow = torch.zeros(len(questions), len(vocab))
    for row, question in enumerate(questions):
        for word in re.findall(r"[a-z]+", question.lower()):
            if word in vocab:
                bow[row, vocab[word]] = 1.0
    return bow


def probe(
    train_x,
    train_y,
    test_x,
    test_y,
    steps: int,
    batch: int = 32,
    seed: int = 0,
    hidden: int = 256,
    activation: type[nn.Module] = nn.ReLU,
) -> float:
    """Test accuracy of an MLP (Linear -> activation -> Linear, Adam 3e-3) trained `steps` batches on x -> y."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(train_x.shape[1], hidden), activation(), nn.Linear(hidden, int(train_y.max()) + 1)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(train_x), (batch,), generator=generator)
        loss = nn.functional.cross_entropy(model(train_x[index]), train_y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float((model(test_x).argmax(-1) == test_y).float().mean())


def main() -> None:
    import easy_vqa

    parser = argparse.ArgumentParser()
    parser.add_argument("--num-test", type=int, default=2000)
    args = parser.parse_args()
    train_q, train_a, train_i = easy_vqa.get_train_questions()
    test_q, test_a, test_i = easy_vqa.get_test_questions()
    answers = {a: k for k, a in enumerate(easy_vqa.get_answers())}
    words = sorted({w for q in train_q for w in re.findall(r"[a-z]+", q.lower())})
    vocab = {w: k for k, w in enumerate(words)}
    train_paths, test_paths = easy_vqa.get_train_image_paths(), easy_vqa.get_test_image_paths()
    train_pixels = pixel_values([train_paths[i] for i in sorted(train_paths)])
    test_pixels = pixel_values([test_paths[i] for i in sorted(test_paths)])
    train_index = {image_id: row for row, image_id in enumerate(sorted(train_paths))}
    test_index = {image_id: row for row, image_id in enumerate(sorted(test_paths))}
    n = args.num_test
    train_bow, test_bow = bag_of_words(train_q, vocab), bag_of_words(test_q[:n], vocab)
    train_y = torch.tensor([answers[a] for a in train_a])
    test_y = torch.tensor([answers[a] for a in test_a[:n]])
    question_only = probe(train_bow, train_y, test_bow, test_y, steps=12000)
    print(f"question only (no image), long budget: {question_only:.3f}")
    print(f"{'recipe':<40} {'quickstart budget':>18} {'10 epochs':>10}")
    for name, recipe in RECIPES.items():
        start = time.perf_counter()
        tower = build_tower(recipe["layers"], recipe["patch"], recipe["factor"])
        every = recipe.get("every", 4)
        train_f = features(tower, train_pixels, recipe["pooling"], every)
        test_f = features(tower, test_pixels, recipe["pooling"], every)
        mean, std = train_f.mean(0), train_f.std(0) + 1e-6
        train_f, test_f = (train_f - mean) / std, (test_f - mean) / std
        train_x = torch.cat([train_f[[train_index[i] for i in train_i]], train_bow], dim=-1)
        test_x = torch.cat([test_f[[test_index[i] for i in test_i[:n]]], test_bow], dim=-1)
        short = probe(train_x, train_y, test_x, test_y, steps=100)
        long = probe(train_x, train_y, test_x, test_y, steps=10 * len(train_x) // 32)
        print(f"{name:<40} {short:>18.3f} {long:>10.3f}   ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    from mmadapters.library_logs import quiet_library_logs

    quiet_library_logs()
    main()
