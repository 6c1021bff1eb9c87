"""transformers' ModelTesterMixin on LaVIN, with tiny configs (as transformers' own LLaVA tests do)."""

from __future__ import annotations

import unittest

from common import IMAGE_TOKEN_ID, FrozenBackbonesCommonTest, TinyBackbonesTester
from hf_tests.test_modeling_common import ModelTesterMixin

from mmadapters import LavinConfig, LavinForConditionalGeneration

VISION_FEATURE_LAYERS = [1, 2]


class LavinModelTester(TinyBackbonesTester):
    def __init__(self, parent) -> None:
        super().__init__(parent, num_image_tokens=len(VISION_FEATURE_LAYERS), image_size=32, patch_size=8)

    def get_config(self) -> LavinConfig:
        return LavinConfig(
            text_config=self.text_config,
            vision_config=self.vision_config,
            vision_feature_layers=VISION_FEATURE_LAYERS,
            image_token_id=IMAGE_TOKEN_ID,
        )

    def prepare_config_and_inputs_for_common(self):
        return self.get_config(), self.image_inputs()


class LavinCommonTest(FrozenBackbonesCommonTest, ModelTesterMixin, unittest.TestCase):
    all_model_classes = (LavinForConditionalGeneration,)
    additional_model_inputs = ["pixel_values"]

    def setUp(self) -> None:
        self.model_tester = LavinModelTester(self)

    @unittest.skip(
        "Refused by design: reentrant checkpointing drops the routers' gradients (tests/test_lavin_model.py)"
    )
    def test_training_gradient_checkpointing_use_reentrant_true(self):
        pass

    # LaVIN runs the decoder twice per forward (the routing-table pass on the two modality tokens, not
    # checkpointed, then the sequence); these tests mock the checkpoint function assuming one call per layer.
    # Checkpointed gradients equal plain ones: tests/test_lavin_model.py::test_gradient_checkpointing_gives_same_gradients.
    @unittest.skip("The decoder runs twice per forward (routing-table pass); see tests/test_lavin_model.py")
    def test_training_gradient_checkpointing(self):
        pass

    @unittest.skip("The decoder runs twice per forward (routing-table pass); see tests/test_lavin_model.py")
    def test_training_gradient_checkpointing_use_reentrant_false(self):
        pass
