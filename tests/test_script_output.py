"""The scripts users rerun (benchmarks/) print their results and no library log lines (see
mmadapters.library_logs); run as users run them, in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "script, row",
    [
        ("parameter_counts.py", "| LLaMA-7B | 2,621,760 | 491,760 | 659,584 | 8,192 | 3,781,296 |"),
        # imports our Trainers, and so transformers' Trainer and bitsandbytes
        ("preference_reference_memory.py", "| LLaMA-7B + ViT-L/14 | 13.13 GiB | 14.4 MiB | 932x |"),
    ],
)
def test_a_benchmark_script_prints_its_table_and_no_library_warnings(script, row):
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert row in completed.stdout
    output = completed.stdout + completed.stderr
    for marker in ("kernels-community", "Warning", "deprecated"):
        assert marker not in output, [line for line in output.splitlines() if marker in line][:3]
