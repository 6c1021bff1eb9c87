"""Where inference runs: `--dtype` / `--device-map` of `mmadapters eval` and `chat`, the demo (flags or the Space's
environment) and the lmms-eval plugin's model_args reach `from_pretrained`, and the inputs follow the model."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch
from PIL import Image

from mmadapters import LavinForConditionalGeneration, LavinProcessor
from mmadapters.cli import main
from mmadapters.inference_loading import inputs_on_model_device, load_for_inference


@pytest.fixture(scope="module")
def checkpoint(tiny_backbones, tmp_path_factory):
    folder = tmp_path_factory.mktemp("inference") / "ckpt"
    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    model.save_pretrained(folder, processor=LavinProcessor.from_backbones(*tiny_backbones))
    return str(folder)


@pytest.fixture()
def loads(monkeypatch):
    """The keywords every from_pretrained of the Auto model class got (the real loader runs)."""
    from transformers import AutoModelForImageTextToText

    seen = []
    original = AutoModelForImageTextToText.from_pretrained.__func__

    def recording(cls, name, *args, **kwargs):
        seen.append(kwargs)
        return original(cls, name, *args, **kwargs)

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", classmethod(recording))
    return seen


def test_load_for_inference_places_and_casts_the_backbones(checkpoint):
    model, processor = load_for_inference(checkpoint, "bfloat16", "cpu")
    assert not model.training
    assert model.language_model.dtype == torch.bfloat16 and model.vision_tower.dtype == torch.bfloat16
    assert model.device == torch.device("cpu")
    inputs = inputs_on_model_device(processor(text=["Image: N/A\nhello"]), model)
    assert inputs["input_ids"].device == model.device
    assert (
        model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[1]
        == inputs["input_ids"].shape[1] + 2
    )
    default, _ = load_for_inference(checkpoint)
    assert default.language_model.dtype == torch.float32  # the README's numbers are float32 on CPU


def test_a_peft_adapter_folder_loads_for_inference_with_its_base_checkpoint(checkpoint, tmp_path):
    """`mmadapters eval` / `chat` / the demo on a folder that `PeftModel.save_pretrained` wrote on top of a
    checkpoint: the checkpoint with the adapter on it, and the checkpoint's processor (the adapter folder has
    none)."""
    from peft import LoraConfig, get_peft_model

    base = LavinForConditionalGeneration.from_pretrained(checkpoint)
    config = LoraConfig(r=2, target_modules=r".*language_model.*\.q_proj", init_lora_weights=False)
    peft_model = get_peft_model(base, config).eval()
    peft_model.save_pretrained(tmp_path / "lora")
    model, processor = load_for_inference(str(tmp_path / "lora"))
    assert type(processor).__name__ == "LavinProcessor" and model.active_adapters() == ["default"]
    inputs = processor(text=["Image: N/A\nhello"])
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, peft_model(**inputs).logits)


def test_eval_and_chat_take_dtype_and_device_map(checkpoint, loads, tmp_path, capsys, monkeypatch):
    assert main(["eval", checkpoint, "--limit", "2", "--dtype", "bfloat16", "--device-map", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 2
    assert loads[-1] == {"dtype": torch.bfloat16, "device_map": "cpu"}
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(image)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {image}\nwhat color?\n/quit\n"))
    assert main(["chat", checkpoint, "--max-new-tokens", "2", "--dtype", "float16"]) == 0
    assert loads[-1] == {"dtype": torch.float16}  # no device map: CPU, as before
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["eval", checkpoint, "--dtype", "float64"])
    assert "dtype must be one of float32, bfloat16, float16, auto; got 'float64'" in capsys.readouterr().err
    assert main(["chat", checkpoint, "--device-map", "nowhere"]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_the_demo_takes_flags_or_the_spaces_environment(checkpoint, monkeypatch):
    from mmadapters.demo import load_demo_model, parse_args

    monkeypatch.delenv("MMADAPTERS_DTYPE", raising=False)
    monkeypatch.delenv("MMADAPTERS_DEVICE_MAP", raising=False)
    args = parse_args([checkpoint])
    assert (args.dtype, args.device_map) == ("float32", None)
    monkeypatch.setenv("MMADAPTERS_DTYPE", "bfloat16")
    monkeypatch.setenv("MMADAPTERS_DEVICE_MAP", "cpu")
    args = parse_args([checkpoint])
    assert (args.dtype, args.device_map) == ("bfloat16", "cpu")
    assert parse_args([checkpoint, "--dtype", "float16"]).dtype == "float16"  # a flag wins
    model, _, _ = load_demo_model(checkpoint, "lavin", args.dtype, args.device_map)
    assert model.language_model.dtype == torch.bfloat16


def test_lmms_eval_model_args_dtype_and_device_map(checkpoint, loads):
    pytest.importorskip("lmms_eval.api.model")
    from mmadapters.integrations.lmms_eval import LavinLMM

    lmm = LavinLMM(pretrained=checkpoint, dtype="bfloat16", device_map="cpu")
    assert lmm.model.language_model.dtype == torch.bfloat16
    assert loads[-1] == {"dtype": torch.bfloat16, "device_map": "cpu"}
    LavinLMM(pretrained=checkpoint, device="cpu")
    assert loads[-1] == {"dtype": torch.float32, "device_map": "cpu"}
    with pytest.raises(ValueError, match="dtype must be one of"):
        LavinLMM(pretrained=checkpoint, dtype="double")


def test_inputs_stay_in_place_when_the_models_first_weights_are_offloaded(checkpoint):
    """Offloaded weights sit on the meta device, where no input can go; accelerate's hooks move the inputs."""
    from types import SimpleNamespace

    _, processor = load_for_inference(checkpoint)
    inputs = processor(text=["Image: N/A\nhello"])
    offloaded = SimpleNamespace(device=torch.device("meta"))
    assert inputs_on_model_device(inputs, offloaded)["input_ids"].device == torch.device("cpu")


ANSWER_WITHOUT_PEFT = """
import sys
import numpy as np
from transformers import AutoModelForImageTextToText, AutoProcessor
import mmadapters
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1])
processor = AutoProcessor.from_pretrained(sys.argv[1])
image = np.zeros((32, 32, 3), dtype=np.uint8)
for images, text in (([image], "<image>\\nWhat is shown?"), (None, "Say hello")):
    model.generate(**processor(images=images, text=text), max_new_tokens=3, do_sample=False)
print(sorted(name for name in ("peft", "bitsandbytes") if name in sys.modules))
"""


def test_answering_imports_neither_peft_nor_bitsandbytes(checkpoint):
    # A model without PEFT layers has nothing of PEFT's to look for, and importing PEFT imports bitsandbytes, which on
    # a CPU tries to fetch a kernel from the Hub and logs its failure: inference (chat, eval, the demo, a pipeline)
    # stays clear of both.
    import subprocess

    ran = subprocess.run(
        [sys.executable, "-c", ANSWER_WITHOUT_PEFT, checkpoint], capture_output=True, text=True, check=False
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.strip().splitlines()[-1] == "[]"
    assert "bitsandbytes" not in ran.stderr
