"""Conformance tests: transformers' own `ModelTesterMixin` run against LaVIN and CROME (`make test-conformance`)."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# transformers 5.25 turns Hub kernels on in every from_pretrained that does not say use_kernels (ours say False);
# tests that load a bare backbone with transformers itself (as a reference) must not fetch kernels either.
os.environ.setdefault("USE_HUB_KERNELS", "NO")
HERE = Path(__file__).resolve().parent
if not (HERE / "_hf" / "hf_tests" / "test_modeling_common.py").is_file():
    raise RuntimeError("Run `python conformance/fetch_common_tests.py` first (`make test-conformance` does).")
sys.path.insert(0, str(HERE / "_hf"))
sys.path.insert(0, str(HERE))  # conformance/common.py

import mmadapters  # noqa: E402,F401  (registers the Auto classes)
