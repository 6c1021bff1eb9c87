"""A fixed whitening of LaVIN's visual features, for vision towers whose features are badly conditioned.

Not in the paper (LAVIN.md section 4 feeds the CLS features straight into the projector); off by default
(`LavinConfig.vision_feature_whitening`). Why we offer it: the embedded vision tower is seeded random (no
pretrained tower is available offline), and its CLS features are a large constant plus an image-dependent part
of about 5% of their norm, spread over directions whose variances span six orders of magnitude. The colour of
an easy-vqa image is linearly decodable from them (0.97 on the test images), yet gradient descent through the
projector does not find it within the quickstart's budget; after whitening, a projector-sized MLP learns colour
and shape within 100 steps (experiments/feature_whitening.py). A pretrained CLIP does not need this.

The statistics (per feature layer: the mean and the PCA whitening matrix of the features of a set of unlabeled
images) are fitted once, before training, like batch norm's running statistics but frozen; they are buffers,
saved with the adapters.
"""

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers import initialization as init


class VisualFeatureWhitening(nn.Module):
    """Per feature layer: (features - mean) @ transform, with `transform` the PCA whitening matrix fitted by
    [`~VisualFeatureWhitening.fit`]. Input and output: (num_images, num_feature_layers, vision width)."""

    def __init__(self, num_feature_layers: int, width: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_feature_layers, width))
        self.register_buffer("transform", torch.eye(width).repeat(num_feature_layers, 1, 1))
        # 1 once fitted (an integer, not a bool: every distributed backend broadcasts it).
        self.register_buffer("fitted", torch.tensor(0))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Unfitted: zero mean, identity transform (what a checkpoint without these buffers gets)."""
        num_layers, width = self.mean.shape
        init.zeros_(self.mean)
        init.copy_(self.transform, torch.eye(width, device=self.transform.device).repeat(num_layers, 1, 1))
        init.zeros_(self.fitted)

    @torch.no_grad()
    def fit(self, features: torch.Tensor, min_relative_variance: float = 1e-6) -> None:
        """Fit mean and whitening matrix per layer to `features` (num_images, num_feature_layers, width).

        Directions with less than `min_relative_variance` times the largest variance are scaled as if they had
        that much (so that noise in directions the images never use is not blown up without bound). The default
        suits a float32 tower; a bf16/fp16 tower cannot resolve variances that small (its features carry about
        three significant digits): use about 1e-3 there.
        """
        num_images, num_layers, width = features.shape
        if (num_layers, width) != tuple(self.mean.shape):
            raise ValueError(
                f"Whitening expects features of shape (images, {self.mean.shape[0]}, {self.mean.shape[1]}), got "
                f"{tuple(features.shape)}."
            )
        if num_images <= width:
            raise ValueError(
                f"Fitting the feature whitening needs more images than the vision width ({width}) to estimate "
                f"a covariance; got {num_images}. Pass more (unlabeled) images."
            )
        features = features.double()
        mean = features.mean(dim=0)
        centred = features - mean
        covariance = torch.einsum("nld,nle->lde", centred, centred) / (num_images - 1)
        variances, directions = torch.linalg.eigh(covariance)  # ascending, per layer
        floor = variances.amax(dim=-1, keepdim=True) * min_relative_variance
        transform = directions / variances.clamp_min(floor).sqrt().unsqueeze(-2)
        self.mean.copy_(mean)
        self.transform.copy_(transform)
        self.fitted.fill_(1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not self.fitted:
            raise RuntimeError(
                "This LaVIN has vision_feature_whitening=True but its whitening is not fitted yet: call "
                "`model.fit_feature_whitening(pixel_values)` with a few thousand unlabeled images first."
            )
        centred = features.to(self.mean.dtype) - self.mean
        return torch.einsum("nld,lde->nle", centred, self.transform)


def fit_whitening_on_images(model: Any, processor: Any, images: Sequence[Any], batch_size: int = 250) -> int:
    """Fit `model`'s feature whitening on `images` (paths, PIL images or arrays; unlabeled), loaded and
    preprocessed by `processor` exactly as its training batches are; returns how many images it saw."""

    def batches() -> Iterator[torch.Tensor]:
        for start in range(0, len(images), batch_size):
            yield processor._pixel_values(images[start : start + batch_size])

    model.fit_feature_whitening(batches())
    return len(images)


__all__ = ["VisualFeatureWhitening", "fit_whitening_on_images"]
