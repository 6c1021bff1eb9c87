"""Training recipes: a YAML file that names the model, the data and the `TrainingArguments`.

```yaml
model: lavin                 # lavin | crome
text_model: embedded         # "embedded" (the offline SmolLM2) or a Hub id / local folder
vision_model: embedded
adapter: {temperature: 10.0} # MMAdapterConfig / CromeAdapterConfig fields
stage: finetune              # crome only: pretrain | instruct | finetune
init_from: ...               # crome only: an InstructBLIP checkpoint to initialise from (optional)
from_checkpoint: ...         # continue from an earlier run's checkpoint instead (optional; then text_model /
                             # vision_model say where its backbones are, if not where it names them, and
                             # adapter may change only the settings that leave its weights alone)
feature_whitening: 4000      # lavin only: whiten the visual features, fitted on this many training images
data: {name: easy_vqa, split: train, limit: 4800, prompt_format: open}  # or scienceqa (split, path, limit),
                             # llava (json, image_folder, limit); path: a local copy of ScienceQA
eval_data: {name: easy_vqa, split: test, limit: 200}   # optional: evaluation loss during training
dtype: bfloat16              # the frozen backbones' dtype (adapters stay float32); default float32
quantization:                # optional, bitsandbytes (BitsAndBytesConfig fields) per backbone: LaVIN-lite
  text_config: {load_in_4bit: true, bnb_4bit_quant_type: nf4, bnb_4bit_use_double_quant: true}
lora: {r: 8, lora_alpha: 16, target_modules: [q_proj, v_proj], on: language_model}  # optional LoRA on top
output_dir: outputs/run
training: {max_steps: 150, per_device_train_batch_size: 32, learning_rate: 3.0e-3}  # TrainingArguments;
                             # bf16: auto = bf16 where the training device computes it natively
hub_license: apache-2.0      # with training.push_to_hub: the model card's license, when the backbones' cards
                             # do not settle it (optional)
```

With `training: {push_to_hub: true, hub_model_id: you/run}` the Trainer pushes each checkpoint as `hub_strategy`
says, and the final checkpoint at the end (`AdapterTrainer.push_to_hub`).

Under several processes (`torchrun`, `accelerate launch`), only the main process prints, saves the final
checkpoint and (through the Trainer) logs.
"""

from __future__ import annotations

import os
import shlex
from typing import Any

import torch

from .errors import MMAdaptersError, closest_names
from .inference_loading import INFERENCE_DTYPES, loading_options
from .precision import native_bfloat16

RECIPE_KEYS = {
    "model",
    "text_model",
    "vision_model",
    "adapter",
    "stage",
    "data",
    "output_dir",
    "training",
    "init_from",
    "from_checkpoint",
    "feature_whitening",
    "eval_data",
    "dtype",
    "quantization",
    "lora",
    "hub_license",
}
# The data sets a recipe names, and the options each takes (anything else in its block is an error, never dropped).
DATA_OPTIONS = {
    "easy_vqa": ("split", "prompt_format", "limit", "seed"),
    "scienceqa": ("split", "path", "limit"),  # path: a local copy (official or Hub parquet layout)
    "llava": ("json", "image_folder", "limit"),
}
DATA_NAMES = tuple(DATA_OPTIONS)
DTYPES = INFERENCE_DTYPES  # the backbones' dtype names, as eval, chat and the demo take them


def is_main_process() -> bool:
    """Whether this is the main process of a multi-process run (torchrun and accelerate set RANK), or the only one."""
    return os.environ.get("RANK", "0") == "0"


class RecipeError(MMAdaptersError, ValueError):
    """A recipe that cannot run: the message says which key is wrong and how to fix it."""


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    if not os.path.isfile(path):
        raise RecipeError(f"Recipe {path} does not exist.")
    with open(path, encoding="utf-8") as f:
        try:
            recipe = yaml.safe_load(f)
        except yaml.YAMLError as error:
            raise RecipeError(f"Recipe {path} is not valid YAML: {error}") from error
        except UnicodeDecodeError as error:
            raise RecipeError(
                f"Recipe {path} is not UTF-8 text (byte {error.start}); save it as UTF-8."
            ) from None
    if not isinstance(recipe, dict):
        raise RecipeError(f"Recipe {path} must be a mapping of keys {sorted(RECIPE_KEYS)}.")
    unknown = sorted(set(recipe) - RECIPE_KEYS)
    if unknown:
        raise RecipeError(
            f"Recipe {path}: unknown key(s) {unknown}{closest_names(unknown, RECIPE_KEYS)}; known keys are "
            f"{sorted(RECIPE_KEYS)}."
        )
    from .methods import METHODS

    if recipe.get("model") not in METHODS:
        raise RecipeError(
            f"Recipe {path}: `model` must be one of {sorted(METHODS)}, got {recipe.get('model')!r}."
        )
    for key in ("data", "eval_data"):
        data = recipe.get(key)
        if (key == "data" or data is not None) and (
            not isinstance(data, dict) or data.get("name") not in DATA_NAMES
        ):
            raise RecipeError(f"Recipe {path}: `{key}.name` must be one of {DATA_NAMES}.")
    whitening = recipe.get("feature_whitening")
    count_given = isinstance(whitening, int) and not isinstance(whitening, bool) and whitening >= 1
    if whitening is not None and (recipe["model"] != "lavin" or not count_given):
        raise RecipeError(
            f"Recipe {path}: `feature_whitening` is LaVIN's, and takes the number of training images to fit the "
            f"whitening on (a positive integer, more than the vision width), got {whitening!r} for {recipe['model']}."
        )
    if "output_dir" not in recipe:
        raise RecipeError(f"Recipe {path}: set `output_dir`.")
    errors = recipe_errors(recipe)
    if errors:
        raise RecipeError(f"Recipe {path}: " + "; ".join(errors) + ".")
    return recipe


# Ranges checked up front for the TrainingArguments fields a recipe sets most (types are checked for all).
TRAINING_RANGES = {
    "max_steps": (lambda v: v >= 1 or v == -1, "at least 1 (or -1: use num_train_epochs)"),
    "per_device_train_batch_size": (lambda v: v >= 1, "at least 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, "at least 1"),
    "learning_rate": (lambda v: v > 0, "positive"),
    "num_train_epochs": (lambda v: v > 0, "positive"),
    "save_steps": (lambda v: v > 0, "positive"),
    "logging_steps": (lambda v: v > 0, "positive"),
    "warmup_steps": (lambda v: v >= 0, "zero or more"),
}


def recipe_errors(recipe: dict[str, Any]) -> list[str]:
    """Every type and range error of a recipe's values, each naming its key (checked before any model loads)."""
    import dataclasses

    from transformers import TrainingArguments

    from .methods import method
    from .validation import type_errors, yaml_number

    errors = []
    for key in ("text_model", "vision_model", "init_from", "from_checkpoint", "output_dir"):
        if key in recipe and not isinstance(recipe[key], str):
            errors.append(f"`{key}` must be a string (a Hub id or a folder), got {recipe[key]!r}")
    if "hub_license" in recipe and not isinstance(recipe["hub_license"], str):
        errors.append(
            f"`hub_license` must be a Hub license identifier such as apache-2.0, got {recipe['hub_license']!r}"
        )
    adapter = recipe.get("adapter") or {}
    if not isinstance(adapter, dict):
        errors.append(f"`adapter` must be a mapping of adapter settings, got {adapter!r}")
    else:
        try:
            method(recipe["model"]).adapter_config_class.from_dict(adapter)
        except (ValueError, TypeError) as error:
            errors.append(f"`adapter`: {error}".rstrip("."))
    for key in ("data", "eval_data"):
        data = recipe.get(key) or {}
        unknown = sorted(set(data) - {"name", *DATA_OPTIONS[data.get("name", "easy_vqa")]})
        if unknown:
            errors.append(
                f"`{key}` has option(s) {unknown} that {data['name']} does not take; it takes "
                f"{list(DATA_OPTIONS[data['name']])}"
            )
        limit = data.get("limit")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            errors.append(f"`{key}.limit` must be a positive integer (or absent: all rows), got {limit!r}")
    if recipe.get("dtype", "float32") not in DTYPES:
        errors.append(f"`dtype` must be one of {DTYPES}, got {recipe.get('dtype')!r}")
    errors.extend(_quantization_errors(recipe.get("quantization")))
    errors.extend(_lora_errors(recipe.get("lora")))
    if recipe.get("init_from") and recipe["model"] != "crome":
        errors.append("`init_from` (an InstructBLIP checkpoint) is CROME's; LaVIN starts from its backbones")
    if recipe.get("from_checkpoint") and recipe.get("init_from"):
        errors.append("`init_from` and `from_checkpoint` both say where the model starts: keep one")
    if recipe.get("from_checkpoint") and recipe.get("feature_whitening") is not None:
        errors.append(
            "`feature_whitening` builds new adapters; a run from `from_checkpoint` keeps the checkpoint's "
            "(its whitening, if fitted, included): leave it out"
        )
    if recipe["model"] == "crome" and recipe.get("stage", "finetune") not in (
        "pretrain",
        "instruct",
        "finetune",
    ):
        errors.append(f"`stage` must be pretrain, instruct or finetune, got {recipe.get('stage')!r}")
    training = recipe.get("training") or {}
    if not isinstance(training, dict):
        return [*errors, f"`training` must be a mapping of TrainingArguments fields, got {training!r}"]
    known = {field.name for field in dataclasses.fields(TrainingArguments)}
    unknown = sorted(set(training) - known - {"resume_from_checkpoint"})
    if unknown:
        errors.append(
            f"`training` has unknown field(s) {unknown}{closest_names(unknown, known)}: use TrainingArguments fields"
        )
    given = {k: v for k, v in training.items() if k in known and not (k == "bf16" and v == "auto")}
    typed = type_errors(TrainingArguments, given)
    for name, message in typed.items():
        written = yaml_number(given[name]) if isinstance(given[name], str) else None
        hint = f": YAML reads {given[name]} as text, write {written}" if written else ""
        errors.append(f"`training.{name}` {message}{hint}")
    for key, (check, wanted) in TRAINING_RANGES.items():
        if key in training and key not in typed and not check(training[key]):
            errors.append(f"`training.{key}` must be {wanted}, got {training[key]!r}")
    resume = training.get("resume_from_checkpoint")
    if resume is not None and not isinstance(resume, (bool, str)):
        errors.append(f"`training.resume_from_checkpoint` must be true or a folder, got {resume!r}")
    return errors


def _quantization_errors(quantization: Any) -> list[str]:
    if quantization is None:
        return []
    if (
        not isinstance(quantization, dict)
        or not quantization
        or not set(quantization) <= {"text_config", "vision_config"}
    ):
        return [
            "`quantization` must map `text_config` and/or `vision_config` to BitsAndBytesConfig fields, got "
            f"{quantization!r}"
        ]
    try:
        quantization_configs(quantization)
    except (ImportError, TypeError, ValueError) as error:
        return [f"`quantization`: {error}".rstrip(".")]
    return []


def quantization_configs(quantization: dict[str, Any]) -> dict[str, Any]:
    """The recipe's `quantization` as transformers' per-backbone `quantization_config` (BitsAndBytesConfig)."""
    import importlib.util

    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("quantised backbones need bitsandbytes: pip install 'mmadapters[quant]'")
    configs = {}
    for role, fields in quantization.items():
        if not isinstance(fields, dict):
            raise TypeError(f"{role} must be a mapping of BitsAndBytesConfig fields, got {fields!r}")
        known = set(BitsAndBytesConfig.__init__.__code__.co_varnames)
        unknown = sorted(set(fields) - known)
        if unknown:
            raise TypeError(f"{role} has unknown BitsAndBytesConfig field(s) {unknown}")
        configs[role] = BitsAndBytesConfig(**fields)
    return configs


def _lora_errors(lora: Any) -> list[str]:
    if lora is None:
        return []
    if not isinstance(lora, dict):
        return [f"`lora` must be a mapping of LoraConfig fields (plus `on`), got {lora!r}"]
    try:
        lora_config(lora)
    except (TypeError, ValueError) as error:
        return [f"`lora`: {error}".rstrip(".")]
    on = lora.get("on", "language_model")
    if on not in ("language_model", "vision_tower", "both"):
        return [f"`lora.on` must be language_model, vision_tower or both, got {on!r}"]
    return []


def lora_config(lora: dict[str, Any]) -> Any:
    """The recipe's `lora` block (LoraConfig fields; `on` is where the LoRA goes) as a LoraConfig."""
    from peft import LoraConfig

    return LoraConfig(**{k: v for k, v in lora.items() if k != "on"})


def resolve_backbones(recipe: dict[str, Any]) -> tuple[str, str]:
    from .modeling.embedded import embedded_backbones

    text_model, vision_model = recipe.get("text_model", "embedded"), recipe.get("vision_model", "embedded")
    if "embedded" in (text_model, vision_model):
        embedded_text, embedded_vision = embedded_backbones()
        text_model = embedded_text if text_model == "embedded" else text_model
        vision_model = embedded_vision if vision_model == "embedded" else vision_model
    return text_model, vision_model


def build_model_and_processor(recipe: dict[str, Any]) -> tuple[Any, Any]:
    """The recipe's model (with its LoRA on top, if any) and processor."""
    model, processor = _build_model_and_processor(recipe)
    if recipe.get("lora"):
        from .modeling.peft_on_top import add_lora

        add_lora(model, lora_config(recipe["lora"]), on=recipe["lora"].get("on", "language_model"))
    return model, processor


def loading_keywords(recipe: dict[str, Any]) -> dict[str, Any]:
    """`dtype` and `quantization_config` for from_backbones / from_pretrained, from the recipe's keys."""
    keywords: dict[str, Any] = {}
    if recipe.get("dtype") not in (None, "float32"):
        keywords["dtype"] = loading_options(recipe["dtype"])["dtype"]
    if recipe.get("quantization"):
        keywords["quantization_config"] = quantization_configs(recipe["quantization"])
    return keywords


def _build_model_and_processor(recipe: dict[str, Any]) -> tuple[Any, Any]:
    from .checkpoint_files import CheckpointKindError
    from .methods import METHODS, method
    from .modeling.adapters import AdapterSettingsError

    if recipe.get("from_checkpoint"):  # continue from an earlier stage's (adapter-only) checkpoint
        # The method's own classes: a checkpoint of the other method is refused before anything loads. The
        # backbones named in the recipe say where the checkpoint's are; `adapter` changes the settings that leave
        # its weights alone (anything else is refused by from_pretrained).
        chosen = method(recipe["model"])
        text_model, vision_model = resolve_backbones(recipe)
        backbones = {
            key: value
            for key, value in (("text_model", text_model), ("vision_model", vision_model))
            if key in recipe
        }
        adapter_settings = {"adapter_config": recipe["adapter"]} if recipe.get("adapter") else {}
        try:
            model = chosen.model_class.from_pretrained(
                recipe["from_checkpoint"], **backbones, **adapter_settings, **loading_keywords(recipe)
            )
        except AdapterSettingsError as error:
            raise RecipeError(f"`adapter` with `from_checkpoint`: {error}") from None
        except CheckpointKindError as error:
            if error.found not in METHODS:
                raise
            raise RecipeError(
                f"`from_checkpoint` {recipe['from_checkpoint']} is a {error.found} checkpoint, but the recipe says "
                f"`model: {recipe['model']}`: set `model: {error.found}`."
            ) from None
        # The checkpoint's processor (`from_checkpoint` may be a PEFT adapter folder, loaded on the one it names;
        # the recipe's backbones are where one the checkpoint does not hold is rebuilt from).
        processor_source = model.name_or_path or recipe["from_checkpoint"]
        return model.train(), chosen.processor_class.from_pretrained(processor_source, **backbones)
    text_model, vision_model = resolve_backbones(recipe)
    adapter = recipe.get("adapter") or {}
    if recipe.get("init_from"):  # CROME: the Q-Former from an InstructBLIP checkpoint
        from .convert import from_instructblip
        from .modeling.adapters import CromeAdapterConfig

        return from_instructblip(
            recipe["init_from"],
            text_model=text_model,
            adapter_config=CromeAdapterConfig.from_dict(adapter),
            **loading_keywords(recipe),
        )
    fields = {"vision_feature_whitening": True} if recipe.get("feature_whitening") else {}
    return method(recipe["model"]).build(
        text_model, vision_model, adapter, **fields, **loading_keywords(recipe)
    )


def build_dataset(data: dict[str, Any], processor: Any) -> Any:
    from .data import load_easy_vqa, load_llava_conversations, load_scienceqa

    options = {k: v for k, v in data.items() if k != "name"}
    if data["name"] == "easy_vqa":
        return load_easy_vqa(**options)
    if data["name"] == "scienceqa":
        return load_scienceqa(**options)
    if "json" not in options:
        raise RecipeError("data.name: llava needs `data.json` (and usually `data.image_folder`).")
    return load_llava_conversations(
        options["json"], options.get("image_folder"), processor, limit=options.get("limit")
    )


def first_distinct_images(rows: Any, count: int) -> list[Any]:
    """The first `count` images of a data set's rows, skipping text-only rows and repeated paths (a path repeats
    across an image's questions). Decoded images are taken as they come: each row decodes its own object."""
    images, seen_paths = [], set()
    for row in rows:
        image = row["image"]
        if image is None or (isinstance(image, str) and image in seen_paths):
            continue
        if isinstance(image, str):
            seen_paths.add(image)
        images.append(image)
        if len(images) == count:
            break
    return images


def resolve_resume(
    recipe: dict[str, Any], resume: str | None, overwrite: bool, path: Any, log: Any
) -> str | None:
    """The checkpoint to resume from: `resume` ("auto", a folder) or the recipe's
    `training.resume_from_checkpoint` (true = "auto"); refuses to start over an earlier run's checkpoints unless
    `overwrite` (they would be overwritten step by step)."""
    training = recipe.get("training") or {}
    if resume is None:
        recipe_value = training.get("resume_from_checkpoint")
        resume = "auto" if recipe_value is True else recipe_value or None
    from .trainers.checkpoints import CHECKPOINT_PREFIX, checkpoint_is_complete, find_last_checkpoint

    output_dir = recipe["output_dir"]
    if resume == "auto":
        found = find_last_checkpoint(output_dir, log)
        if found is None:
            log(f"No complete checkpoint in {output_dir}: starting from step 0.")
        return found
    if resume is not None:
        problem = "the folder does not exist" if not os.path.isdir(resume) else checkpoint_is_complete(resume)
        if problem is not None:
            raise RecipeError(f"Cannot resume from {resume}: {problem}.")
        return str(resume)
    earlier = os.path.isdir(output_dir) and any(
        n.startswith(CHECKPOINT_PREFIX) for n in os.listdir(output_dir)
    )
    if earlier and not overwrite:
        raise RecipeError(
            f"Recipe {path}: {output_dir} holds checkpoints of an earlier run. Continue it with --resume auto (or "
            "`training.resume_from_checkpoint: true`), or pass --overwrite to start over and replace them."
        )
    return None


def train_from_recipe(
    path: str | os.PathLike, resume: str | None = None, overwrite: bool = False, log: Any = print
) -> str:
    """Train as the recipe says; returns the folder of the final adapter-only checkpoint.

    `resume`: "auto" (the last complete checkpoint in the recipe's output_dir) or a checkpoint folder; the
    recipe's `training.resume_from_checkpoint` does the same. The model is built under the recipe's
    `training.seed` (transformers' default 42), so two runs of one recipe give identical weights."""
    from transformers import TrainingArguments, set_seed

    from .methods import method
    from .trainers import VisionLanguageCollator

    recipe = load_recipe(path)
    if not is_main_process():  # one process prints (the Trainer logs on the main process only, too)
        log = _silent
    checkpoint = resolve_resume(recipe, resume, overwrite, path, log)
    set_seed((recipe.get("training") or {}).get("seed", 42))  # before the adapters are initialised
    model, processor = build_model_and_processor(recipe)
    dataset = build_dataset(recipe["data"], processor)
    if recipe.get("feature_whitening") and not recipe.get("from_checkpoint"):  # a checkpoint has it fitted
        from .modeling.lavin.feature_whitening import fit_whitening_on_images

        images = first_distinct_images(dataset, recipe["feature_whitening"])
        width = model.config.vision_config.hidden_size
        if len(images) <= width:
            raise RecipeError(
                f"Recipe {path}: `feature_whitening` got {len(images)} distinct training images, and the whitening "
                f"needs more than the vision width ({width}): raise `feature_whitening` or `data.limit`."
            )
        fit_whitening_on_images(model, processor, images)
    eval_dataset = build_dataset(recipe["eval_data"], processor) if recipe.get("eval_data") else None
    training = {"report_to": [], "remove_unused_columns": False, **(recipe.get("training") or {})}
    if eval_dataset is not None:
        training.setdefault("eval_strategy", "steps")
    training.pop("resume_from_checkpoint", None)  # handled above: passed to train()
    if training.get("bf16") == "auto":  # ours: bf16 only where it is not emulated (mmadapters.precision)
        on_gpu = torch.cuda.is_available() and not training.get("use_cpu")
        training["bf16"] = native_bfloat16("cuda" if on_gpu else "cpu")
    try:
        args = TrainingArguments(output_dir=recipe["output_dir"], **training)
    except TypeError as error:
        raise RecipeError(
            f"Recipe {path}: bad `training` entry ({error}); use TrainingArguments fields."
        ) from error
    kwargs = dict(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        data_collator=VisionLanguageCollator(processor),
        processing_class=processor,
        hub_license=recipe.get("hub_license"),
    )
    trainer = method(recipe["model"]).trainer(recipe, **kwargs)
    trainer.resume_hint = f"mmadapters train {shlex.quote(os.fspath(path))} --resume"
    if checkpoint is not None:
        log(f"Resuming from {checkpoint}.")
    trainer.train(resume_from_checkpoint=checkpoint)
    final = os.path.join(recipe["output_dir"], "final")
    if trainer.args.should_save:  # the main process only (several processes share the folder)
        model.save_pretrained(final, processor=processor)
    if trainer.args.push_to_hub:  # every process: the Trainer saves on all of them, pushes from the main one
        url = trainer.push_to_hub()
        log(f"Pushed the final checkpoint to {url}")
    # Every process leaves together: one exiting while the main one still saves can abort the process group.
    trainer.accelerator.wait_for_everyone()
    return final


def _silent(*_: Any) -> None:
    """Where the other processes' messages go."""
