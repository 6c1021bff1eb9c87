"""Loading a checkpoint to answer questions: `mmadapters eval`, `mmadapters chat`, the demo and the lmms-eval plugin.

Each takes the same choices, as `from_pretrained` keywords:
- `dtype`: the frozen backbones' dtype ("float32", the default, reproduces the numbers in the README on CPU;
  "bfloat16" or "float16" halve the memory of a 7B LLM on a GPU; "auto": the dtype the model was saved in);
- `device_map`: None (the default: CPU), one device ("cuda", "cuda:1", "mps"), or a strategy that splits the
  model over the available GPUs ("auto", "balanced"; each adapter goes with its decoder layer);
- `text_model` / `vision_model`: where the backbones are when not where the checkpoint was trained (a local copy,
  or a Hub id, for an adapter-only checkpoint that names a folder on another machine); checked against the
  fingerprints the checkpoint recorded, as `from_pretrained(..., text_model=...)` does;
- `ignore_backbone_mismatch`: load the adapters onto backbones whose weights differ from those they were trained
  on (a fine-tuned variant), as `from_pretrained` takes it.

The model's inputs go to `model.device` (`inputs_on_model_device`), where its embeddings are.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from .hub import check_checkpoint_name
from .modeling.image_tokens import ImageTokenMismatchError
from .processing import InvalidImageError, InvalidTextError, PromptTooLongError

INFERENCE_DTYPES = ("float32", "bfloat16", "float16", "auto")

# Errors that are the user's input (an image, a question), shown as a plain message in the chats (`mmadapters
# chat`, the demo), which then go on.
USER_ERRORS = (InvalidImageError, InvalidTextError, ImageTokenMismatchError, PromptTooLongError, ValueError)


def inference_dtype(value: str) -> str:
    """A `--dtype` value, checked (argparse type and lmms-eval model_args)."""
    if value not in INFERENCE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(INFERENCE_DTYPES)}; got {value!r}.")
    return value


def loading_options(dtype: str = "float32", device_map: str | None = None) -> dict[str, Any]:
    """`from_pretrained` / `from_backbones` keywords for a `dtype` name and a `device_map` (None or "": CPU)."""
    inference_dtype(dtype)
    options: dict[str, Any] = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    if device_map:
        options["device_map"] = device_map
    return options


def load_for_inference(
    name: str,
    dtype: str = "float32",
    device_map: str | None = None,
    text_model: str | None = None,
    vision_model: str | None = None,
    ignore_backbone_mismatch: bool = False,
) -> tuple[Any, Any]:
    """(model in eval mode, processor) of a checkpoint folder or Hub repo (any of our methods)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    check_checkpoint_name(name)
    backbones = {"text_model": text_model, "vision_model": vision_model}
    model = AutoModelForImageTextToText.from_pretrained(
        name,
        **loading_options(dtype, device_map),
        **{key: value for key, value in backbones.items() if value},
        **({"ignore_backbone_mismatch": True} if ignore_backbone_mismatch else {}),
    )
    # The processor is the checkpoint's: `name` may be a PEFT adapter folder, loaded on the checkpoint it names. The
    # backbones given are where a processor the checkpoint does not hold is rebuilt from.
    processor = AutoProcessor.from_pretrained(
        model.name_or_path or name, **{key: value for key, value in backbones.items() if value}
    )
    return model.eval(), processor


def inputs_on_model_device(inputs: Any, model: Any) -> Any:
    """The processor's output (a BatchFeature) on the model's device: where a model moved with `.to("cuda")` or
    placed by a device map reads its input ids (the processor builds them on CPU). When the first weights are
    offloaded (the meta device), the inputs stay where they are: accelerate's hooks move them."""
    if model.device.type == "meta":
        return inputs
    return inputs.to(model.device)


# The flags `add_inference_arguments` adds, as `load_for_inference` names its keywords.
INFERENCE_ARGUMENTS = ("dtype", "device_map", "text_model", "vision_model", "ignore_backbone_mismatch")


def inference_keywords(args: argparse.Namespace) -> dict[str, Any]:
    """`load_for_inference` keywords from a command's parsed `add_inference_arguments` flags."""
    return {name: getattr(args, name) for name in INFERENCE_ARGUMENTS}


def add_inference_arguments(parser: argparse.ArgumentParser, environment: bool = False) -> None:
    """`--dtype`, `--device-map`, `--text-model`, `--vision-model` and `--ignore-backbone-mismatch` on a command
    that loads a checkpoint. With `environment`, the first four defaults come from MMADAPTERS_DTYPE /
    MMADAPTERS_DEVICE_MAP / MMADAPTERS_TEXT_MODEL / MMADAPTERS_VISION_MODEL when set (a Space's settings, where no
    flag can be passed)."""
    dtype_default = os.environ.get("MMADAPTERS_DTYPE", "float32") if environment else "float32"
    device_map_default = os.environ.get("MMADAPTERS_DEVICE_MAP") if environment else None
    for role in ("text", "vision"):
        parser.add_argument(
            f"--{role}-model",
            default=os.environ.get(f"MMADAPTERS_{role.upper()}_MODEL") if environment else None,
            help=f"the {role} backbone (a local folder or Hub id) when it is not where the checkpoint names it, "
            "e.g. a checkpoint trained on another machine's folder; checked against the checkpoint's record "
            "(default: the backbone the checkpoint names)",
        )
    parser.add_argument(
        "--ignore-backbone-mismatch",
        action="store_true",
        help="load the adapters onto backbones whose weights differ from those they were trained on (e.g. a "
        "fine-tuned variant); without it that is an error",
    )
    parser.add_argument(
        "--dtype",
        type=_dtype_argument,
        default=dtype_default,
        help=f"the frozen backbones' dtype: {', '.join(INFERENCE_DTYPES)} (default: %(default)s; bfloat16 on a GPU "
        "halves the memory)",
    )
    parser.add_argument(
        "--device-map",
        default=device_map_default,
        help='where the model runs: a device ("cuda", "cuda:1") or "auto" to split it over the GPUs (default: CPU)',
    )


def _dtype_argument(value: str) -> str:
    try:
        return inference_dtype(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


__all__ = [
    "INFERENCE_DTYPES",
    "add_inference_arguments",
    "INFERENCE_ARGUMENTS",
    "inference_dtype",
    "inference_keywords",
    "inputs_on_model_device",
    "load_for_inference",
    "loading_options",
]
