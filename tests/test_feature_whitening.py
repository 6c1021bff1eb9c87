"""The optional visual feature whitening (LavinConfig.vision_feature_whitening; not in the paper)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_sample_inputs

from mmadapters import LavinForConditionalGeneration, LavinProcessor
from mmadapters.modeling.lavin.feature_whitening import VisualFeatureWhitening


def correlated_features(num_images: int, layers: int = 2, width: int = 6, seed: int = 0) -> torch.Tensor:
    """Features like a random tower's: a large constant, and directions whose variances differ by 1e4."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, 0, width)
    mixing = torch.randn(layers, width, width, generator=generator)
    latent = torch.randn(num_images, layers, width, generator=generator) * scales
    return torch.einsum("nld,lde->nle", latent, mixing) + 5.0


def test_whitened_features_have_zero_mean_and_identity_covariance():
    features = correlated_features(2000)
    whitening = VisualFeatureWhitening(2, 6)
    whitening.fit(features, min_relative_variance=1e-12)  # no direction below the floor: exact whitening
    out = whitening(features).double()
    assert torch.allclose(out.mean(dim=0), torch.zeros(2, 6, dtype=torch.float64), atol=1e-3)
    for layer in range(2):
        covariance = torch.cov(out[:, layer].T)
        assert torch.allclose(covariance, torch.eye(6, dtype=torch.float64), atol=1e-3)
    # Before whitening the same features are far from it: the test can fail.
    assert torch.cov(features[:, 0].T).diagonal().min() < 0.5 * torch.cov(features[:, 0].T).diagonal().max()


def test_variance_floor_limits_the_gain_of_empty_directions():
    features = correlated_features(500)
    features[..., :] = features[..., :1].expand_as(features) * torch.arange(1, 7)  # rank 1 per layer
    whitening = VisualFeatureWhitening(2, 6)
    whitening.fit(features, min_relative_variance=1e-4)
    largest_variance = torch.cov(features[:, 0].double().T).diagonal().sum()
    gain = torch.linalg.matrix_norm(whitening.transform[0].double(), ord=2)
    assert gain <= 1.01 / (1e-4 * largest_variance).sqrt()
    assert torch.isfinite(whitening(features)).all()


def test_unfitted_whitening_and_bad_fits_raise_clear_errors():
    whitening = VisualFeatureWhitening(2, 6)
    with pytest.raises(RuntimeError, match="not fitted yet: call `model.fit_feature_whitening"):
        whitening(torch.zeros(1, 2, 6))
    with pytest.raises(ValueError, match="more images than the vision width"):
        whitening.fit(correlated_features(6))
    with pytest.raises(ValueError, match=r"shape \(images, 2, 6\)"):
        whitening.fit(torch.zeros(100, 3, 6))


@pytest.fixture()
def whitened_lavin(tiny_backbones, randomize_adapters):
    torch.manual_seed(0)
    model = LavinForConditionalGeneration.from_backbones(
        *tiny_backbones, vision_feature_whitening=True
    ).eval()
    randomize_adapters(model, std=0.3)
    generator = torch.Generator().manual_seed(1)
    model.fit_feature_whitening([torch.randn(40, 3, 32, 32, generator=generator) for _ in range(2)])
    return model, LavinProcessor.from_backbones(*tiny_backbones)


def test_model_whitens_the_features_it_was_fitted_on(whitened_lavin):
    model, _ = whitened_lavin
    pixels = torch.randn(80, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whitened = model.feature_whitening(model.pooled_vision_features(pixels))
    assert torch.allclose(whitened.mean(dim=0), torch.zeros_like(whitened[0]), atol=1e-3)
    # The same images as the fit: unit variance in every direction (up to the variance floor).
    assert torch.allclose(whitened.var(dim=0), torch.ones_like(whitened[0]), atol=1e-2)


def test_whitening_is_saved_with_the_adapters(whitened_lavin, tmp_path):
    model, processor = whitened_lavin
    inputs = tiny_sample_inputs(processor)
    model.save_pretrained(tmp_path, processor=processor)
    loaded = LavinForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.config.vision_feature_whitening
    assert int(loaded.feature_whitening.fitted) == 1
    assert torch.equal(loaded.feature_whitening.transform, model.feature_whitening.transform)
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits, model(**inputs).logits, atol=1e-5)


def test_unfitted_model_refuses_images_and_unwhitened_model_refuses_fit(tiny_backbones):
    processor = LavinProcessor.from_backbones(*tiny_backbones)
    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones, vision_feature_whitening=True)
    with pytest.raises(RuntimeError, match="whitening is not fitted yet"):
        model(**tiny_sample_inputs(processor))
    plain = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    assert plain.feature_whitening is None
    with pytest.raises(ValueError, match="vision_feature_whitening=True"):
        plain.fit_feature_whitening(torch.zeros(40, 3, 32, 32))


def test_whitening_with_a_bf16_tower_keeps_float32_and_the_adapter_dtype(tiny_backbones):
    torch.manual_seed(0)
    model = LavinForConditionalGeneration.from_backbones(
        *tiny_backbones, vision_feature_whitening=True, dtype=torch.bfloat16
    ).eval()
    model.fit_feature_whitening(torch.randn(40, 3, 32, 32), min_relative_variance=1e-3)
    assert model.vision_tower.dtype == torch.bfloat16
    assert model.feature_whitening.transform.dtype == model.projector.linear_1.weight.dtype == torch.float32
    pixels = torch.randn(2, 3, 32, 32)
    features = model.image_tokens(pixels)
    assert features.dtype == torch.float32 and torch.isfinite(features).all()
    assert features.shape == (2, model.config.num_image_tokens, model.config.text_config.hidden_size)


def test_autocast_leaves_the_tower_and_the_whitening_in_float32(whitened_lavin):
    # Mixed-precision training (the quickstart's bf16=True) runs the model under autocast; the whitening would
    # amplify bfloat16 rounding of the tower's features, so they are computed outside it.
    model, _ = whitened_lavin
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        features = model.feature_whitening(model.pooled_vision_features(pixels))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens = model.image_tokens(pixels)
            bf16_features = model.feature_whitening(model.pooled_vision_features(pixels))
    assert tokens.dtype == torch.bfloat16  # the projector runs under autocast like the LLM
    expected = model.projector(features).to(torch.bfloat16)
    assert torch.allclose(tokens.float(), expected.float(), rtol=2e-2, atol=2e-2)
    # What autocast would have done to the whitened features: far from the float32 ones.
    assert (bf16_features.float() - features).abs().max() > 10 * (
        tokens.float() - expected.float()
    ).abs().max()
