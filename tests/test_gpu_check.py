"""benchmarks/gpu_check.py at tiny size on the CPU, so that the script prepared for a lent GPU cannot rot."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_gpu_check_runs_every_measurement_at_tiny_size(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    results = {entry["run"]: entry for entry in module.run("tiny", "cpu", str(tmp_path), steps=1)}
    for run in ("lavin_bf16_train", "peft_lora_r8_train", "full_finetune_train", "lavin_lite_4bit_train"):
        assert results[run]["step_s"] > 0 and results[run]["trainable"] > 0, run
    for run in ("lavin_bf16_generate", "bare_llm_generate", "lavin_lite_4bit_generate"):
        assert results[run]["tokens_per_s"] > 0, run
    # LaVIN trains its adapters only: more than LoRA r=8 on two projections, far fewer than the whole LLM.
    assert results["peft_lora_r8_train"]["trainable"] < results["lavin_bf16_train"]["trainable"]
    assert results["lavin_bf16_train"]["trainable"] < results["full_finetune_train"]["trainable"]
    assert results["lavin_lite_4bit_train"]["trainable"] == results["lavin_bf16_train"]["trainable"]
    assert results["inference_on_device"]["same_as_cpu"] and all(results["inference_on_device"]["answers"])
