"""Training recipes: a YAML file that names the model, the data and the `TrainingArguments`.

```yaml
model: lavin                 # lavin | crome
text_model: embedded         # "embedded" (the offline SmolLM2) or a Hub id / local folder
vision_model: embedded
adapter: {temperature: 10.0} # MMAdapterConfig / CromeAdapterConfig fields
stage: finetune              # crome only: pretrain | instruct | finetune
init_from: ...               # crome only: an InstructBLIP checkpoint to initialise from (optional)
from_checkpoint: ...         # continue from an earlier run's checkpoint instead (optional)
feature_whitening: 4000      # lavin only: whiten the visual features, fitted on this many training images
data: {name: easy_vqa, split: train, limit: 4800, prompt_format: open}
output_dir: outputs/run
training: {max_steps: 150, per_device_train_batch_size: 32, learning_rate: 3.0e-3}  # TrainingArguments
```
"""

from __future__ import annotations

import os
from typing import Any

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
}
DATA_NAMES = ("easy_vqa", "scienceqa", "llava")


class RecipeError(ValueError):
    """A recipe that cannot run: the message says which key is wrong and how to fix it."""


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    if not os.path.isfile(path):
        raise RecipeError(f"Recipe {path} does not exist.")
    with open(path) as f:
        try:
            recipe = yaml.safe_load(f)
        except yaml.YAMLError as error:
            raise RecipeError(f"Recipe {path} is not valid YAML: {error}") from error
    if not isinstance(recipe, dict):
        raise RecipeError(f"Recipe {path} must be a mapping of keys {sorted(RECIPE_KEYS)}.")
    unknown = sorted(set(recipe) - RECIPE_KEYS)
    if unknown:
        raise RecipeError(f"Recipe {path}: unknown key(s) {unknown}; known keys are {sorted(RECIPE_KEYS)}.")
    if recipe.get("model") not in ("lavin", "crome"):
        raise RecipeError(f"Recipe {path}: `model` must be 'lavin' or 'crome', got {recipe.get('model')!r}.")
    data = recipe.get("data")
    if not isinstance(data, dict) or data.get("name") not in DATA_NAMES:
        raise RecipeError(f"Recipe {path}: `data.name` must be one of {DATA_NAMES}.")
    whitening = recipe.get("feature_whitening")
    count_given = isinstance(whitening, int) and not isinstance(whitening, bool) and whitening >= 1
    if whitening is not None and (recipe["model"] != "lavin" or not count_given):
        raise RecipeError(
            f"Recipe {path}: `feature_whitening` is LaVIN's, and takes the number of training images to fit the "
            f"whitening on (a positive integer, more than the vision width), got {whitening!r} for {recipe['model']}."
        )
    if "output_dir" not in recipe:
        raise RecipeError(f"Recipe {path}: set `output_dir`.")
    return recipe


def resolve_backbones(recipe: dict[str, Any]) -> tuple[str, str]:
    from .modeling.embedded import embedded_backbones

    text_model, vision_model = recipe.get("text_model", "embedded"), recipe.get("vision_model", "embedded")
    if "embedded" in (text_model, vision_model):
        embedded_text, embedded_vision = embedded_backbones()
        text_model = embedded_text if text_model == "embedded" else text_model
        vision_model = embedded_vision if vision_model == "embedded" else vision_model
    return text_model, vision_model


def build_model_and_processor(recipe: dict[str, Any]) -> tuple[Any, Any]:
    from .modeling.adapters import CromeAdapterConfig, MMAdapterConfig
    from .modeling.crome import CromeForConditionalGeneration
    from .modeling.lavin import LavinForConditionalGeneration
    from .processing import CromeProcessor, LavinProcessor

    if recipe.get("from_checkpoint"):  # continue from an earlier stage's (adapter-only) checkpoint
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(recipe["from_checkpoint"])
        return model.train(), AutoProcessor.from_pretrained(recipe["from_checkpoint"])
    text_model, vision_model = resolve_backbones(recipe)
    adapter = recipe.get("adapter") or {}
    if recipe["model"] == "lavin":
        model = LavinForConditionalGeneration.from_backbones(
            text_model,
            vision_model,
            adapter_config=MMAdapterConfig.from_dict(adapter),
            vision_feature_whitening=bool(recipe.get("feature_whitening")),
        )
        return model, LavinProcessor.from_backbones(text_model, vision_model)
    if recipe.get("init_from"):
        from .convert import from_instructblip

        model, processor = from_instructblip(
            recipe["init_from"], text_model=text_model, adapter_config=CromeAdapterConfig.from_dict(adapter)
        )
        return model, processor
    model = CromeForConditionalGeneration.from_backbones(
        text_model, vision_model, adapter_config=CromeAdapterConfig.from_dict(adapter)
    )
    processor = CromeProcessor.from_backbones(
        text_model, vision_model, num_image_tokens=model.config.num_image_tokens
    )
    return model, processor


def build_dataset(data: dict[str, Any], processor: Any) -> Any:
    from .data import load_easy_vqa, load_llava_conversations, load_scienceqa

    options = {k: v for k, v in data.items() if k != "name"}
    if data["name"] == "easy_vqa":
        return load_easy_vqa(**options)
    if data["name"] == "scienceqa":
        return load_scienceqa(options.get("split", "train"))
    if "json" not in options:
        raise RecipeError("data.name: llava needs `data.json` (and usually `data.image_folder`).")
    return load_llava_conversations(options["json"], options.get("image_folder"), processor)


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


def train_from_recipe(path: str | os.PathLike) -> str:
    """Train as the recipe says; returns the folder of the final adapter-only checkpoint."""
    from transformers import TrainingArguments

    from .trainers import CromeTrainer, LavinTrainer, VisionLanguageCollator

    recipe = load_recipe(path)
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
    training = {"report_to": [], "remove_unused_columns": False, **(recipe.get("training") or {})}
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
        data_collator=VisionLanguageCollator(processor),
        processing_class=processor,
    )
    trainer = (
        CromeTrainer(stage=recipe.get("stage", "finetune"), **kwargs)
        if recipe["model"] == "crome"
        else LavinTrainer(**kwargs)
    )
    trainer.train()
    final = os.path.join(recipe["output_dir"], "final")
    model.save_pretrained(final, processor=processor)
    return final
