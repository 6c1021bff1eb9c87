"""transformers' ModelTesterMixin on LaVIN, with tiny configs (as transformers' own LLaVA tests do)."""

from __future__ import annotations

import unittest

import torch
from hf_tests.test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor
from transformers import CLIPVisionConfig, LlamaConfig

from mmadapters import LavinConfig, LavinForConditionalGeneration

IMAGE_TOKEN_ID = 3


class LavinModelTester:
    # batch_size 7: the common attention tests grow smaller batches to 7 rows with random ids (no image tokens)
    # while keeping the images, which LaVIN refuses as a token/image mismatch.
    def __init__(self, parent, batch_size: int = 7, text_length: int = 7) -> None:
        self.parent = parent
        self.batch_size = batch_size
        self.vision_feature_layers = [1, 2]
        self.num_image_tokens = len(self.vision_feature_layers)
        self.seq_length = text_length + self.num_image_tokens
        self.is_training = True
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.image_size = 32
        self.patch_size = 8
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

    def get_config(self) -> LavinConfig:
        return LavinConfig(
            text_config=self.text_config,
            vision_config=self.vision_config,
            vision_feature_layers=self.vision_feature_layers,
            image_token_id=IMAGE_TOKEN_ID,
        )

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 4) + 4
        input_ids[:, : self.num_image_tokens] = IMAGE_TOKEN_ID
        pixel_values = floats_tensor([self.batch_size, 3, self.image_size, self.image_size])
        attention_mask = torch.ones_like(input_ids)
        return config, {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
        }


class LavinCommonTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (LavinForConditionalGeneration,)
    additional_model_inputs = ["pixel_values"]
    _is_composite = True
    test_torch_exportable = False  # the export mixin is not in the sdist (a stand-in replaces it)

    def setUp(self) -> None:
        self.model_tester = LavinModelTester(self)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        # Causal-LM labels, as the common tests give causal LMs (our class is an image-text-to-text model, which
        # they give none): the input ids, image placeholders ignored.
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels)
        if return_labels:
            inputs_dict["labels"] = inputs_dict["input_ids"].masked_fill(
                inputs_dict["input_ids"] == IMAGE_TOKEN_ID, -100
            )
        return inputs_dict

    # Not applicable, each with the reason (also listed in the README, "Conformance"):

    @unittest.skip("GenerationTesterMixin is not in the transformers sdist; generate is tested in tests/")
    def test_generation_tester_mixin_inheritance(self):
        pass

    @unittest.skip("No base model: the frozen LLM, the vision tower and the adapters hang off one class")
    def test_model_base_model_prefix(self):
        pass

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
