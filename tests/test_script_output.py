"""The scripts users rerun (benchmarks/) print their results and no library log lines (see
mmadapters.library_logs); run as users run them, in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_a_benchmark_script_prints_its_table_and_no_library_warnings():
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "parameter_counts.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "| LLaMA-7B | 2,621,760 | 491,760 | 659,584 | 8,192 | 3,781,296 |" in completed.stdout
    output = completed.stdout + completed.stderr
    for marker in ("kernels-community", "Warning", "deprecated"):
        assert marker not in output, [line for line in output.splitlines() if marker in line][:3]
