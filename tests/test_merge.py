"""Merged export of LaVIN's LLM adapters (issue: Hub sharing and conversion, item 5)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_llm_with_width, save_tiny_llm, save_tiny_vision
from transformers import AutoModelForCausalLM

from mmadapters import LavinForConditionalGeneration, LavinProcessor, MMAdapterConfig
from mmadapters.cli import main
from mmadapters.convert.merge import MergeError, merge_lavin_adapters


def image(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8).numpy()


@pytest.fixture()
def trained_checkpoint(tiny_backbones, randomize_adapters, tmp_path):
    torch.manual_seed(0)
    model = LavinForConditionalGeneration.from_backbones(
        *tiny_backbones, adapter_config=MMAdapterConfig(temperature=5.0, placement="attn_mlp")
    ).eval()
    randomize_adapters(model, std=0.3)
    with torch.no_grad():  # non-zero down-projection biases, so the constant term c matters
        for layer in model.llm_adapters:
            for site in layer.sites():
                site.down.bias.normal_(0, 0.5)
    processor = LavinProcessor.from_backbones(*tiny_backbones)
    folder = tmp_path / "lavin"
    model.save_pretrained(folder, processor=processor)
    return str(folder), processor


# A script run with mmadapters unimportable: the merged folder must load with transformers alone.
PLAIN_LOAD = """
import sys, torch
sys.modules["mmadapters"] = None  # any `import mmadapters` now fails
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
ids = torch.tensor([[int(t) for t in sys.argv[2].split(",")]])
torch.save(model(input_ids=ids).logits, sys.argv[3])
"""


def test_merged_text_export_matches_unmerged_and_loads_without_mmadapters(trained_checkpoint, tmp_path):
    folder, processor = trained_checkpoint
    unmerged = LavinForConditionalGeneration.from_pretrained(folder)
    inputs = processor(text=["Image: N/A\nthe capital of france is"])
    with torch.no_grad():
        expected = unmerged(**inputs).logits

    out = tmp_path / "merged"
    assert main(["merge", folder, str(out), "--modality", "text"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["attention_bias"] and config["mlp_bias"]
    assert "auto_map" not in config
    assert json.loads((out / "mmadapters_merge.json").read_text())["modality"] == "text"

    logits_file = tmp_path / "logits.pt"
    ids = ",".join(str(int(t)) for t in inputs["input_ids"][0])
    subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(out), ids, str(logits_file)], check=True)
    merged_logits = torch.load(logits_file)
    torch.testing.assert_close(merged_logits, expected, atol=1e-5, rtol=0)
    # The adapters do matter: the bare LLM gives other logits on the same tokens.
    bare = AutoModelForCausalLM.from_pretrained(unmerged.config.text_backbone["name_or_path"])
    with torch.no_grad():
        assert not torch.allclose(bare(input_ids=inputs["input_ids"]).logits, expected, atol=1e-3)


def test_merged_image_export_matches_unmerged_image_sample(trained_checkpoint):
    folder, processor = trained_checkpoint
    model = LavinForConditionalGeneration.from_pretrained(folder)
    inputs = processor(images=[[image(3)]], text=["Image: <image>\nwhat shape is it?"])
    with torch.no_grad():
        expected = model(**inputs).logits
        image_mask = inputs["input_ids"] == model.config.image_token_id
        embeds, _ = model._place_image_features(
            image_mask, inputs["pixel_values"], model.embed_tokens(inputs["input_ids"])
        )
        merged = merge_lavin_adapters(model, "image")
        got = merged(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_merge_differs_per_modality_and_from_the_bare_llm(trained_checkpoint):
    folder, processor = trained_checkpoint
    ids = processor(text=["Image: N/A\nhello there"])["input_ids"]
    with torch.no_grad():
        text = merge_lavin_adapters(LavinForConditionalGeneration.from_pretrained(folder), "text")(ids).logits
        image_llm = merge_lavin_adapters(LavinForConditionalGeneration.from_pretrained(folder), "image")
        image_logits = image_llm(ids).logits
    assert not torch.allclose(text, image_logits, atol=1e-3)


def test_merge_refuses_an_architecture_without_bias_option(tmp_path, tiny_backbones, randomize_adapters):
    llm = save_tiny_llm(tmp_path / "mistral", kind="mistral")
    model = LavinForConditionalGeneration.from_backbones(llm, tiny_backbones[1]).eval()
    randomize_adapters(model)
    with pytest.raises(MergeError, match="no bias on q_proj, k_proj, v_proj"):
        merge_lavin_adapters(model, "text")
    with pytest.raises(MergeError, match="modality must be"):
        merge_lavin_adapters(model, "audio")


@pytest.mark.parametrize("routing", ["learned", "modality"])
def test_a_merged_model_is_consumed_and_refuses_to_run_or_merge_again(
    tiny_backbones, randomize_adapters, routing
):
    """merge_lavin_adapters folds the adapters into the LLM and detaches them: the LaVIN it was given then
    computed without its adapters (fixed routing) or stopped with a KeyError (learned routing), and a second merge
    folded the adapters into the LLM twice (fixed routing). Each is refused, naming the reload."""
    model = LavinForConditionalGeneration.from_backbones(
        *tiny_backbones, adapter_config=MMAdapterConfig(llm_routing=routing)
    ).eval()
    randomize_adapters(model)
    ids = torch.tensor([[1, 40, 50, 60]])
    merged = merge_lavin_adapters(model, "text")
    expected = merged(ids).logits
    calls = {
        "forward": lambda: model(input_ids=ids),
        "generate": lambda: model.generate(input_ids=ids, max_new_tokens=2),
        "routing table": model.compute_routing_table,
        "second merge": lambda: merge_lavin_adapters(model, "text"),
    }
    for call in calls.values():
        with pytest.raises(RuntimeError, match=r"adapters are detached.*from_pretrained"):
            call()
    torch.testing.assert_close(merged(ids).logits, expected)  # the refused merge changed nothing


def test_merge_takes_backbones_that_moved(trained_checkpoint, tiny_backbones, tmp_path, capsys):
    """A checkpoint whose backbone folders are not where it names them: --text-model / --vision-model (as eval and
    chat take them; --llm / --vision are the same flags) say where they are."""
    import shutil

    folder, _ = trained_checkpoint
    text_copy, vision_copy = tmp_path / "llm-copy", tmp_path / "vision-copy"
    shutil.copytree(tiny_backbones[0], text_copy)
    shutil.copytree(tiny_backbones[1], vision_copy)
    config = json.loads((Path(folder) / "config.json").read_text())
    for role in ("text", "vision"):
        config[f"{role}_backbone"]["name_or_path"] = str(tmp_path / f"gone-{role}")
    (Path(folder) / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["merge", folder, str(tmp_path / "refused"), "--text-model", str(text_copy)]) == 2
    assert "--vision-model" in capsys.readouterr().err and not os.path.exists(tmp_path / "refused")
    out = tmp_path / "merged"
    command = ["merge", folder, str(out), "--text-model", str(text_copy), "--vision-model", str(vision_copy)]
    assert main(command) == 0
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"


def test_merge_cli_rejects_missing_checkpoint(tmp_path, capsys):
    assert main(["merge", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def test_merge_refuses_to_overwrite_its_input_or_another_checkpoint(trained_checkpoint, tmp_path, capsys):
    folder, _ = trained_checkpoint
    before = snapshot(folder)
    # Output = input: refused before anything is loaded or written.
    assert main(["merge", folder, folder]) == 2
    assert "overlaps the input" in capsys.readouterr().err
    assert snapshot(folder) == before
    # Output inside the input folder: refused too.
    assert main(["merge", folder, os.path.join(folder, "merged")]) == 2
    assert snapshot(folder) == before
    # Output holding another checkpoint: refused unless --overwrite, which replaces it whole.
    other = tmp_path / "other"
    assert main(["merge", folder, str(other)]) == 0
    (other / "notes.md").write_text("kept")
    first = snapshot(other)
    assert main(["merge", folder, str(other), "--modality", "image"]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert snapshot(other) == first
    assert main(["merge", folder, str(other), "--modality", "image", "--overwrite"]) == 0
    assert json.loads((other / "mmadapters_merge.json").read_text())["modality"] == "image"
    assert (other / "notes.md").read_text() == "kept"


def test_merged_export_includes_a_lora_on_top(trained_checkpoint, tmp_path):
    from peft import LoraConfig

    from mmadapters import add_lora

    folder, processor = trained_checkpoint
    model = LavinForConditionalGeneration.from_pretrained(folder)
    add_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    model.save_pretrained(tmp_path / "with-lora")
    inputs = processor(text=["Image: N/A\nthe capital of france is"])
    with torch.no_grad():
        expected = model(**inputs).logits
    out = tmp_path / "merged"
    assert main(["merge", str(tmp_path / "with-lora"), str(out), "--modality", "text"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        logits = merged(input_ids=inputs["input_ids"]).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    # The LoRA matters: LaVIN without it gives other logits.
    model.disable_adapters()
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits, expected, atol=1e-3)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantised_llm_is_dequantized_and_merged_as_it_computed(tmp_path, randomize_adapters, bits):
    """LaVIN-lite: folding into packed 4-bit weights failed with a shape error, and into int8 weights wrote
    nonsense. The LLM is dequantized first: the merged LLM computes what LaVIN computes on the dequantized weights,
    and what the quantised LaVIN computes up to its kernels' rounding."""
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    from mmadapters import add_lora

    llm, vision = save_llm_with_width(tmp_path / "llm", 64), save_tiny_vision(tmp_path / "vision")
    quantization = {"text_config": BitsAndBytesConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8)}
    torch.manual_seed(0)
    model = LavinForConditionalGeneration.from_backbones(llm, vision, quantization_config=quantization)
    randomize_adapters(model, std=0.3)
    processor = LavinProcessor.from_backbones(llm, vision)
    model.save_pretrained(tmp_path / "lite", processor=processor)
    inputs = processor(text=["Image: N/A\nthe capital of france is"])

    assert main(["merge", str(tmp_path / "lite"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    quantised = LavinForConditionalGeneration.from_pretrained(tmp_path / "lite").eval()
    dequantized = LavinForConditionalGeneration.from_pretrained(tmp_path / "lite").eval()
    dequantized.language_model.dequantize()
    with torch.no_grad():
        logits = merged(input_ids=inputs["input_ids"]).logits
        torch.testing.assert_close(logits, dequantized(**inputs).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(logits, quantised(**inputs).logits, atol=1e-2, rtol=0)

    # The model that has just run merges as well (our backbones' 4-bit weights are not repacked on the CPU).
    with torch.no_grad():
        again = merge_lavin_adapters(quantised, "text")(input_ids=inputs["input_ids"]).logits
    torch.testing.assert_close(again, logits, atol=1e-5, rtol=0)
    with_lora = LavinForConditionalGeneration.from_pretrained(tmp_path / "lite")
    add_lora(with_lora, LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(MergeError, match="quantised \\(bitsandbytes\\) and holds PEFT layers"):
        merge_lavin_adapters(with_lora, "text")


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_a_quantised_full_checkpoint_merges_as_its_adapter_only_checkpoint_does(tmp_path, randomize_adapters):
    """LaVIN-lite saved with every weight: its LLM carried no quantizer (transformers' loader put it on the whole
    model), so the merge folded into the packed 4-bit weights and failed with a shape error from torch."""
    from transformers import BitsAndBytesConfig

    llm, vision = save_llm_with_width(tmp_path / "llm", 64), save_tiny_vision(tmp_path / "vision")
    quantization = {"text_config": BitsAndBytesConfig(load_in_4bit=True)}
    torch.manual_seed(0)
    model = LavinForConditionalGeneration.from_backbones(llm, vision, quantization_config=quantization)
    randomize_adapters(model, std=0.3)
    processor = LavinProcessor.from_backbones(llm, vision)
    model.save_pretrained(tmp_path / "lite", processor=processor)
    model.save_pretrained(tmp_path / "full", processor=processor, adapter_only=False)

    for kind in ("lite", "full"):
        assert main(["merge", str(tmp_path / kind), str(tmp_path / f"merged-{kind}")]) == 0
    inputs = processor(text=["Image: N/A\nthe capital of france is"])
    with torch.no_grad():
        logits = {
            kind: AutoModelForCausalLM.from_pretrained(tmp_path / f"merged-{kind}", dtype=torch.float32)(
                input_ids=inputs["input_ids"]
            ).logits
            for kind in ("lite", "full")
        }
    torch.testing.assert_close(logits["full"], logits["lite"], atol=1e-5, rtol=0)


def test_merge_of_a_crome_checkpoint_says_there_is_nothing_to_fold(tiny_backbones, tmp_path, capsys):
    """CROME's trained modules sit in front of the LLM: `merge` refuses it by saying so (it used to point at the
    Auto classes, which load it but do not merge it), and writes nothing."""
    from conftest import tiny_qformer_config

    from mmadapters import CromeForConditionalGeneration

    model = CromeForConditionalGeneration.from_backbones(
        *tiny_backbones, qformer=tiny_qformer_config(vocab_size=302), num_query_tokens=4
    )
    model.save_pretrained(tmp_path / "crome")
    assert main(["merge", str(tmp_path / "crome"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "CROME checkpoint" in err and "in front of the LLM" in err and "nothing to fold" in err
    assert "mmadapters push" in err
    assert not os.path.exists(tmp_path / "out")
