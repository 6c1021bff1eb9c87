"""transformers' ModelTesterMixin on CROME (decoder-only LLM), with tiny configs."""

from __future__ import annotations

import unittest

import torch
from common import IMAGE_TOKEN_ID, VOCAB_SIZE, FrozenBackbonesCommonTest, TinyBackbonesTester
from hf_tests.test_modeling_common import ModelTesterMixin, ids_tensor
from transformers import InstructBlipQFormerConfig

from mmadapters import CromeConfig, CromeForConditionalGeneration

NUM_QUERY_TOKENS = 4
IMAGE_SIZE, PATCH_SIZE = 16, 8
QFORMER_LENGTH = 5


class CromeModelTester(TinyBackbonesTester):
    def __init__(self, parent) -> None:
        num_image_tokens = NUM_QUERY_TOKENS + (IMAGE_SIZE // PATCH_SIZE) ** 2  # queries, then patches
        super().__init__(
            parent, num_image_tokens=num_image_tokens, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE
        )
        self.qformer_config = InstructBlipQFormerConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            encoder_hidden_size=32,
            max_position_embeddings=64,
            cross_attention_frequency=1,
        )

    def get_config(self) -> CromeConfig:
        return CromeConfig(
            text_config=self.text_config,
            vision_config=self.vision_config,
            qformer_config=self.qformer_config,
            num_query_tokens=NUM_QUERY_TOKENS,
            image_token_id=IMAGE_TOKEN_ID,
        )

    def prepare_config_and_inputs_for_common(self):
        inputs = self.image_inputs()
        prompt_mask = torch.ones_like(inputs["input_ids"])
        prompt_mask[:, : self.num_image_tokens] = 0
        inputs.update(
            qformer_input_ids=ids_tensor([self.batch_size, QFORMER_LENGTH], self.vocab_size),
            qformer_attention_mask=torch.ones(self.batch_size, QFORMER_LENGTH, dtype=torch.long),
            prompt_mask=prompt_mask,
        )
        return self.get_config(), inputs


class CromeCommonTest(FrozenBackbonesCommonTest, ModelTesterMixin, unittest.TestCase):
    all_model_classes = (CromeForConditionalGeneration,)
    additional_model_inputs = ["pixel_values", "qformer_input_ids", "qformer_attention_mask", "prompt_mask"]

    def setUp(self) -> None:
        self.model_tester = CromeModelTester(self)
