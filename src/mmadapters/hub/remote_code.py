"""The small code file written next to every checkpoint so that transformers loads it without `import mmadapters`.

`config.json` and `processor_config.json` get an `auto_map` pointing at `mmadapters_loader.py`, which imports the
installed package (and, when it is missing or too old, raises one message: what the repository is and the `pip
install` line). So `AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True)`, `AutoProcessor` and
`pipeline(..., trust_remote_code=True)` work in a process that never imports mmadapters itself; with
`import mmadapters` no remote code runs at all (the Auto classes know our model types).

Why the file imports the package instead of carrying the model code (a self-contained modeling file): the models
are a few thousand lines across modules (adapters, backbone loading, checkpoints, processors); a flattened copy in
every repository would drift from the package and could not be fixed by an upgrade. One `pip install` is the
price, and the message says it.
"""

from __future__ import annotations

import os

LOADER_MODULE = "mmadapters_loader"
LOADER_FILE = f"{LOADER_MODULE}.py"
# The first release whose checkpoint layout (mmadapters_model.safetensors, peft_adapters) this file describes.
MINIMUM_VERSION = "0.2.0"

_LOADER_SOURCE = '''"""Loads this repository through the installed mmadapters package (written by mmadapters).

This repository holds LaVIN or CROME adapters trained with mmadapters: only the adapter weights; the frozen
backbones are downloaded from their own repositories. transformers runs this file when you pass
trust_remote_code=True. It only imports the package, which must be installed:

    pip install "mmadapters>={minimum}"

(With `import mmadapters` in your code, no remote code is needed at all.)
"""

MINIMUM_VERSION = "{minimum}"

try:
    import mmadapters
except ImportError as error:
    raise ImportError(
        "This repository holds LaVIN/CROME adapters made with mmadapters, which is not installed. Install it with "
        '`pip install "mmadapters>={minimum}"` and load the repository again.'
    ) from error


def _version(text):
    return tuple(int(part) if part.isdigit() else 0 for part in text.split("+")[0].split(".")[:3])


if _version(mmadapters.__version__) < _version(MINIMUM_VERSION):
    raise ImportError(
        f"This repository needs mmadapters >= {{MINIMUM_VERSION}}, but {{mmadapters.__version__}} is installed. Upgrade "
        '`pip install -U "mmadapters>={minimum}"`.'
    )

LavinConfig = mmadapters.LavinConfig
LavinForConditionalGeneration = mmadapters.LavinForConditionalGeneration
LavinProcessor = mmadapters.LavinProcessor
CromeConfig = mmadapters.CromeConfig
CromeForConditionalGeneration = mmadapters.CromeForConditionalGeneration
CromeProcessor = mmadapters.CromeProcessor
'''


def loader_source() -> str:
    """The text of `mmadapters_loader.py`."""
    return _LOADER_SOURCE.format(minimum=MINIMUM_VERSION)


def write_loader(folder: str | os.PathLike) -> None:
    with open(os.path.join(folder, LOADER_FILE), "w", encoding="utf-8") as f:
        f.write(loader_source())


def model_auto_map(config_class: type, model_class: type) -> dict[str, str]:
    """`auto_map` for a model's config.json: the Auto classes it loads with under trust_remote_code (the
    processor's is in processor_config.json)."""
    model = f"{LOADER_MODULE}.{model_class.__name__}"
    return {
        "AutoConfig": f"{LOADER_MODULE}.{config_class.__name__}",
        "AutoModel": model,
        "AutoModelForImageTextToText": model,
    }


def processor_auto_map(processor_class: type) -> dict[str, str]:
    """`auto_map` for processor_config.json."""
    return {"AutoProcessor": f"{LOADER_MODULE}.{processor_class.__name__}"}


__all__ = [
    "LOADER_FILE",
    "MINIMUM_VERSION",
    "loader_source",
    "model_auto_map",
    "processor_auto_map",
    "write_loader",
]
