"""transformers' ModelTesterMixin on CROME (decoder-only LLM), with tiny configs."""

from __future__ import annotations

import unittest

import torch
from hf_tests.test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor
from transformers import CLIPVisionConfig, InstructBlipQFormerConfig, LlamaConfig

from mmadapters import CromeConfig, CromeForConditionalGeneration

IMAGE_TOKEN_ID = 3


class CromeModelTester:
    # batch_size 7: see conformance/test_common_lavin.py.
    def __init__(self, parent, batch_size: int = 7, text_length: int = 7) -> None:
        self.parent = parent
        self.batch_size = batch_size
        self.num_query_tokens = 4
        self.image_size = 16
        self.patch_size = 8
        self.num_image_tokens = self.num_query_tokens + (self.image_size // self.patch_size) ** 2
        self.seq_length = text_length + self.num_image_tokens
        self.qformer_length = 5
        self.is_training = True
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.text_config = LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=37,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        )
        self.vision_config = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=self.image_size,
            patch_size=self.patch_size,
        )
        self.qformer_config = InstructBlipQFormerConfig(
            vocab_size=self.vocab_size,
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
            num_query_tokens=self.num_query_tokens,
            image_token_id=IMAGE_TOKEN_ID,
        )

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 4) + 4
        input_ids[:, : self.num_image_tokens] = IMAGE_TOKEN_ID
        prompt_mask = torch.ones_like(input_ids)
        prompt_mask[:, : self.num_image_tokens] = 0
        inputs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": floats_tensor([self.batch_size, 3, self.image_size, self.image_size]),
            "qformer_input_ids": ids_tensor([self.batch_size, self.qformer_length], self.vocab_size),
            "qformer_attention_mask": torch.ones(self.batch_size, self.qformer_length, dtype=torch.long),
            "prompt_mask": prompt_mask,
        }
        return config, inputs


class CromeCommonTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (CromeForConditionalGeneration,)
    additional_model_inputs = ["pixel_values", "qformer_input_ids", "qformer_attention_mask", "prompt_mask"]
    _is_composite = True
    test_torch_exportable = False  # the export mixin is not in the sdist (a stand-in replaces it)

    def setUp(self) -> None:
        self.model_tester = CromeModelTester(self)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        # Causal-LM labels (see conformance/test_common_lavin.py).
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels)
        if return_labels:
            inputs_dict["labels"] = inputs_dict["input_ids"].masked_fill(
                inputs_dict["input_ids"] == IMAGE_TOKEN_ID, -100
            )
        return inputs_dict

    @unittest.skip("GenerationTesterMixin is not in the transformers sdist; generate is tested in tests/")
    def test_generation_tester_mixin_inheritance(self):
        pass

    @unittest.skip("No base model: the frozen LLM, the vision tower and the adapters hang off one class")
    def test_model_base_model_prefix(self):
        pass
