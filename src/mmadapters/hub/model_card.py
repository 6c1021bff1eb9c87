"""The model card (README.md) written next to an adapter-only checkpoint when it is pushed to the Hub."""

from __future__ import annotations

import json
import os
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ..checkpoint_files import ADAPTER_WEIGHTS_NAME, adapter_weights_file
from ..errors import MMAdaptersError
from ..method_names import METHOD_NAMES
from .names import is_hub_id
from .remote_code import MINIMUM_VERSION

EVAL_RESULTS_NAME = "eval_results.json"

_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ method_name }} adapters for **{{ text_name }}** with the vision tower **{{ vision_name }}**: {{ method_text }}.
This repository holds only the adapters ({{ adapter_size }}, {{ trainable }} trainable parameters); the frozen
backbones are downloaded from their own repositories at the revisions below and checked against the weight
fingerprints recorded in `config.json`.{{ quantisation_note }}

## Base models

| role | model | revision | license |
|---|---|---|---|
{{ backbone_rows }}

## Evaluation

{{ evaluation }}

## Usage

```bash
pip install "mmadapters{{ extras }}>={{ minimum_version }}"
```

```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import mmadapters  # registers LaVIN and CROME with the Auto classes (or pass trust_remote_code=True instead)

model = AutoModelForImageTextToText.from_pretrained("{{ repo_id }}")
processor = AutoProcessor.from_pretrained("{{ repo_id }}")
image = Image.new("RGB", (224, 224), "white")  # your image: Image.open("photo.jpg")
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is this?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[image], text=prompt)
output = model.generate(**inputs, max_new_tokens=32)
{{ answer_lines }}
```

Or from the command line: `mmadapters chat {{ repo_id }}` (on a GPU: `--dtype bfloat16 --device-map cuda`). Backbones stored elsewhere can be given with
`from_pretrained("{{ repo_id }}", text_model=..., vision_model=...)`. Without `import mmadapters`,
`from_pretrained(..., trust_remote_code=True)` runs `mmadapters_loader.py`, which only imports the installed package.
"""

# The snippet's last lines: a decoder-only LLM's generate returns the prompt and the answer, an encoder-decoder
# one's (CROME on T5) the answer only (as `mmadapters.evaluation.generate.answer_tokens` reads them).
_ANSWER_LINES = {
    False: 'print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
    True: "# The LLM is encoder-decoder: generate returns the answer alone.\n"
    "print(processor.decode(output[0], skip_special_tokens=True))",
}


def _quantisation_note(config: dict[str, Any]) -> str:
    """For a checkpoint trained on quantised backbones (LaVIN-lite): how they are loaded again (needs the `quant`
    extra, which installs bitsandbytes)."""
    record = config.get("backbone_quantization") or {}
    parts = []
    for role, name in (("text_config", "LLM"), ("vision_config", "vision tower")):
        settings = record.get(role)
        if settings:
            bits = (
                "4-bit" if settings.get("load_in_4bit") else "8-bit" if settings.get("load_in_8bit") else ""
            )
            kind = settings.get("bnb_4bit_quant_type") if settings.get("load_in_4bit") else None
            detail = " ".join(x for x in (bits, kind) if x)
            parts.append(
                f"the {name} ({settings.get('quant_method', 'quantised')}{', ' + detail if detail else ''})"
            )
    if not parts:
        return ""
    return (
        f" It was trained on quantised backbones and loads them quantised again: {' and '.join(parts)}, as "
        "recorded in `config.json` (`from_pretrained(..., quantization_config=...)` overrides it)."
    )


def _llm_is_encoder_decoder(config: dict[str, Any]) -> bool:
    """Whether the checkpoint's LLM is encoder-decoder: saved configs leave out values equal to their class's
    default, so T5's `is_encoder_decoder: true` is read from its config class."""
    from transformers import CONFIG_MAPPING

    text = config.get("text_config") or {}
    if "is_encoder_decoder" in text:
        return bool(text["is_encoder_decoder"])
    model_type = text.get("model_type")
    return model_type in CONFIG_MAPPING and bool(
        getattr(CONFIG_MAPPING[model_type], "is_encoder_decoder", False)
    )


# Licenses of the backbones the package embeds (portable names; see mmadapters.modeling.embedded).
KNOWN_LICENSES = {
    "mmadapters://embedded/smollm2-135m-instruct": "apache-2.0",  # SmolLM2-135M-Instruct's license
    "mmadapters://embedded/clip-vision-tiny-seed0-v1": "apache-2.0",  # random weights made by this package
}


class LicenseError(MMAdaptersError, ValueError):
    """The card's license cannot be decided: the message says to pass one."""


def backbone_license(name: str | None, endpoint: str | None = None, token: str | None = None) -> str | None:
    """The license of a backbone: known for the embedded ones, read from a Hub backbone's model card (its
    README.md front matter), else None."""
    if name in KNOWN_LICENSES:
        return KNOWN_LICENSES[name]
    if not is_hub_id(name):
        return None
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(name, "README.md", endpoint=endpoint, token=token)
        license_name = ModelCard.load(path, ignore_metadata_errors=True).data.license
    except Exception:  # offline, no card, no front matter: unknown
        return None
    return str(license_name) if license_name else None


def decide_license(licenses: dict[str, str | None], given: str | None) -> str:
    """The repo's license: `given`, else the backbones' common license; otherwise a LicenseError that asks for one."""
    if given:
        return given
    known = {value for value in licenses.values() if value}
    if len(known) == 1 and all(licenses.values()):
        return known.pop()
    described = ", ".join(f"{name}: {value or 'unknown'}" for name, value in licenses.items())
    raise LicenseError(
        f"The model card needs a license, and the backbones' do not settle it ({described}). Pass one: "
        "`mmadapters push ... --license apache-2.0` (or `license=` to push_folder / push_to_hub), a Hub license "
        "identifier compatible with the backbones' terms."
    )


def count_parameters(safetensors_path: str) -> int:
    """Number of values in a safetensors file, read from its header (no tensor is loaded)."""
    from safetensors import safe_open

    total = 0
    with safe_open(safetensors_path, framework="pt") as handle:
        for key in handle.keys():
            numel = 1
            for size in handle.get_slice(key).get_shape():
                numel *= size
            total += numel
    return total


def _evaluation_section(folder: str) -> tuple[str, dict[str, Any] | None]:
    path = os.path.join(folder, EVAL_RESULTS_NAME)
    if not os.path.isfile(path):
        return "No evaluation was recorded with this checkpoint.", None
    with open(path) as f:
        results = json.load(f)
    rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in results["metrics"].items())
    text = (
        f"On {results['num_questions']} questions of {results['dataset']} (`{results.get('command', 'mmadapters eval')}`):\n\n"
        f"| metric | value |\n|---|---|\n{rows}"
    )
    return text, results


def build_model_card(
    folder: str,
    repo_id: str,
    license: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
) -> ModelCard:
    """A model card for the adapter-only checkpoint in `folder`, to be pushed as `repo_id`: YAML front matter with
    the license (`license`, else the backbones' common one; a LicenseError otherwise), `base_model` with
    `base_model_relation: adapter`, `library_name`, `pipeline_tag`, `datasets` and a `model-index` from a recorded
    evaluation; a usage snippet that runs as written."""
    from huggingface_hub import EvalResult

    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    names = METHOD_NAMES.get(config.get("model_type"))
    method_name, method_text = (
        (names.name, names.description) if names else (config.get("model_type", "?"), "adapters")
    )
    backbones = {role: config.get(f"{role}_backbone") or {} for role in ("text", "vision")}
    licenses = {
        ref.get("name_or_path") or role: backbone_license(ref.get("name_or_path"), endpoint, token)
        for role, ref in backbones.items()
    }
    card_license = decide_license(licenses, license)
    rows = "\n".join(
        f"| {role} | {ref.get('name_or_path')} | {ref.get('revision') or '(local folder)'} | "
        f"{licenses.get(ref.get('name_or_path') or role) or 'unknown'} |"
        for role, ref in backbones.items()
    )
    weights = adapter_weights_file(folder) or os.path.join(folder, ADAPTER_WEIGHTS_NAME)
    trainable = count_parameters(weights) if os.path.isfile(weights) else 0
    size = os.path.getsize(weights) if os.path.isfile(weights) else 0
    evaluation, results = _evaluation_section(folder)
    base_models = [ref["name_or_path"] for ref in backbones.values() if is_hub_id(ref.get("name_or_path"))]
    eval_results = None
    datasets = None
    if results is not None:
        dataset = results["dataset"]
        eval_results = [
            EvalResult(
                task_type="visual-question-answering",
                dataset_type=dataset,
                dataset_name=dataset,
                metric_type="accuracy",
                metric_name=name,
                metric_value=value,
            )
            for name, value in results["metrics"].items()
        ]
        datasets = [dataset] if is_hub_id(dataset) else None
    card_data = ModelCardData(
        license=card_license,
        base_model=base_models or None,
        base_model_relation="adapter" if base_models else None,
        pipeline_tag="image-text-to-text",
        library_name="mmadapters",
        datasets=datasets,
        tags=["mmadapters", config.get("model_type", "adapters"), "adapter", "vision-language"],
        model_name=repo_id.split("/")[-1] if eval_results else None,
        eval_results=eval_results,
    )
    return ModelCard.from_template(
        card_data,
        template_str=_TEMPLATE,
        title=repo_id.split("/")[-1],
        method_name=method_name,
        method_text=method_text,
        text_name=backbones["text"].get("name_or_path"),
        vision_name=backbones["vision"].get("name_or_path"),
        adapter_size=f"{size / 1e6:.1f} MB",
        trainable=f"{trainable:,}",
        backbone_rows=rows,
        evaluation=evaluation,
        repo_id=repo_id,
        minimum_version=MINIMUM_VERSION,
        extras="[quant]" if config.get("backbone_quantization") else "",
        quantisation_note=_quantisation_note(config),
        answer_lines=_ANSWER_LINES[_llm_is_encoder_decoder(config)],
    )


def write_eval_results(folder: str, dataset: str, result: dict[str, Any], command: str) -> None:
    """Record an evaluation next to a checkpoint (the model card shows the last one)."""
    if "metrics" in result:  # a benchmark task: its table as computed (ScienceQA, MME, MMBench)
        metrics = dict(result["metrics"])
    else:
        metrics = {"accuracy": result["accuracy"]}
        metrics.update({f"accuracy ({group})": value for group, value in result.get("by_group", {}).items()})
    payload = {"dataset": dataset, "num_questions": result["count"], "metrics": metrics, "command": command}
    with open(os.path.join(folder, EVAL_RESULTS_NAME), "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
