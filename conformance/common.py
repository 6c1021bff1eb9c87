"""What the LaVIN and CROME conformance tests share: the tiny LLM and vision tower configs, the image token, and
the test-class pieces that apply to every model built on frozen backbones."""

from __future__ import annotations

import unittest

import torch
from hf_tests.test_modeling_common import floats_tensor, ids_tensor
from transformers import CLIPVisionConfig, LlamaConfig

IMAGE_TOKEN_ID = 3
VOCAB_SIZE = 99
HIDDEN_SIZE = 32
NUM_LAYERS = 2
NUM_HEADS = 4


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=37,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )


def tiny_clip_config(image_size: int, patch_size: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )


class TinyBackbonesTester:
    """The model tester attributes the common tests read. batch_size 7: the common attention tests grow smaller
    batches to 7 rows with random ids (no image tokens) while keeping the images, which our models refuse as a
    token/image mismatch."""

    def __init__(self, parent, num_image_tokens: int, image_size: int, patch_size: int, text_length: int = 7):
        self.parent = parent
        self.batch_size = 7
        self.num_image_tokens = num_image_tokens
        self.seq_length = text_length + num_image_tokens
        self.is_training = True
        self.vocab_size = VOCAB_SIZE
        self.hidden_size = HIDDEN_SIZE
        self.num_hidden_layers = NUM_LAYERS
        self.num_attention_heads = NUM_HEADS
        self.image_size = image_size
        self.patch_size = patch_size
        self.text_config = tiny_llama_config()
        self.vision_config = tiny_clip_config(image_size, patch_size)

    def image_inputs(self) -> dict[str, torch.Tensor]:
        """input_ids starting with one image's placeholders, its attention mask and pixel values."""
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 4) + 4
        input_ids[:, : self.num_image_tokens] = IMAGE_TOKEN_ID
        pixel_values = floats_tensor([self.batch_size, 3, self.image_size, self.image_size])
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixel_values,
        }


class FrozenBackbonesCommonTest:
    """Mixed into each ModelTesterMixin test class (before it)."""

    _is_composite = True
    test_torch_exportable = False  # the export mixin is not in the sdist (a stand-in replaces it)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        # Causal-LM labels, as the common tests give causal LMs (our classes are image-text-to-text models, which
        # they give none): the input ids, image placeholders ignored.
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels)
        if return_labels:
            inputs_dict["labels"] = inputs_dict["input_ids"].masked_fill(
                inputs_dict["input_ids"] == IMAGE_TOKEN_ID, -100
            )
        return inputs_dict

    def test_model_weights_reload_no_missing_tied_weights(self):
        """Replaces transformers' test of the same name, which nukes every weight in model.safetensors and expects each
        to be reported as missing. Ours: a full checkpoint without its backbones' weights is refused (frozen backbones
        would stay random; MissingWeightsError names them), and one with the backbones but without our modules'
        weights reports exactly those as missing, as transformers does (they get their initialisation)."""
        import os
        import tempfile

        from safetensors.torch import load_file, save_file

        from mmadapters import MissingWeightsError

        for model_class in self.all_model_classes:
            config, _ = self.model_tester.prepare_config_and_inputs_for_common()
            model = model_class(config)
            with tempfile.TemporaryDirectory() as tmp_dir:
                model.save_pretrained(tmp_dir)
                weights_file = os.path.join(tmp_dir, "model.safetensors")
                weights = load_file(weights_file)
                save_file({"tensor": torch.tensor([1, 2])}, weights_file, metadata={"format": "pt"})
                with self.assertRaisesRegex(MissingWeightsError, "language_model\\..*would be random"):
                    model_class.from_pretrained(tmp_dir, output_loading_info=True)
                backbones = ("language_model.", "vision_tower.")
                kept = {name: tensor for name, tensor in weights.items() if name.startswith(backbones)}
                save_file(kept, weights_file, metadata={"format": "pt"})
                reloaded, infos = model_class.from_pretrained(tmp_dir, output_loading_info=True)
                ours = {name for name in reloaded.state_dict() if not name.startswith(backbones)}
                self.assertEqual(set(infos["missing_keys"]), ours)

    # Not applicable, each with the reason (also listed in the README, "Conformance"):

    @unittest.skip("GenerationTesterMixin is not in the transformers sdist; generate is tested in tests/")
    def test_generation_tester_mixin_inheritance(self):
        pass

    @unittest.skip(
        "No base model module: the frozen LLM, the vision tower and the adapters hang off one class (base_model is "
        "a view that runs the model without its LM head)"
    )
    def test_model_base_model_prefix(self):
        pass
