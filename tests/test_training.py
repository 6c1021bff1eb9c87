"""Training and evaluation: collator masking, ScienceQA strings, scorers, Trainer checkpoints and resume."""

from __future__ import annotations

import json
import os
import re

import datasets
import pytest
import torch
from conftest import dropout_off, make_trainer, save_image, tiny_qformer_config, toy_dataset
from safetensors.torch import load_file
from transformers import TrainingArguments

from mmadapters import CromeForConditionalGeneration, LavinForConditionalGeneration, LavinProcessor
from mmadapters.data import format_scienceqa, load_easy_vqa, load_llava_conversations, scienceqa_example
from mmadapters.evaluation import (
    accuracy_by_group,
    extract_described_answer,
    extract_letter,
    extract_word,
    scienceqa_table,
)
from mmadapters.trainers import CromeTrainer, LavinTrainer, VisionLanguageCollator


@pytest.fixture()
def processor(tiny_backbones):
    return LavinProcessor.from_backbones(*tiny_backbones)


# --- collator ---------------------------------------------------------------------------------------------------


def test_collator_masks_prompt_image_and_padding(processor, tmp_path):
    tok = processor.tokenizer
    image = save_image(tmp_path, "red.png", (255, 0, 0))
    examples = [
        {"prompt": "Image: <image>\nwhat color?", "target": " red", "image": image},
        {"prompt": "Image: N/A\nhi", "target": " yo", "image": None},
    ]
    batch = VisionLanguageCollator(processor)(examples)
    for row, example in enumerate(examples):
        prompt_ids = tok(example["prompt"].replace("<image>", "<image>" * processor.num_image_tokens))[
            "input_ids"
        ]
        answer_ids = tok(example["target"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        expected = [-100] * len(prompt_ids) + answer_ids
        labels = batch["labels"][row].tolist()
        assert (
            labels[: len(expected)] == expected
        )  # prompt (incl. image tokens) masked, answer + EOS supervised
        assert all(label == -100 for label in labels[len(expected) :])  # padding masked
    assert batch["pixel_values"].shape[0] == 1  # mixture batch: one image, one text-only sample
    with pytest.raises(KeyError, match="target"):
        VisionLanguageCollator(processor)([{"prompt": "Image: N/A\nhi", "image": None}])
    # pad_to_multiple_of, as transformers' collators take it (tensor cores like multiples of 8; 7 here does not divide the width): more padding, the
    # same tokens and labels
    rounded = VisionLanguageCollator(processor, pad_to_multiple_of=7)(examples)
    width = batch["input_ids"].shape[1]
    assert rounded["input_ids"].shape[1] == -(-width // 7) * 7 > width
    for name in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(rounded[name][:, :width], batch[name])
    assert not rounded["attention_mask"][:, width:].any() and (rounded["labels"][:, width:] == -100).all()
    # padding="max_length": every batch as wide as max_length (static shapes), the same tokens and labels
    fixed = VisionLanguageCollator(processor, max_length=width + 5, padding="max_length")(examples)
    assert fixed["input_ids"].shape[1] == width + 5
    for name in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(fixed[name][:, :width], batch[name])


def test_collator_truncation_policy(processor):
    long_answer = " the shape is red." * 30
    batch = VisionLanguageCollator(processor, max_length=24)(
        [{"prompt": "Image: N/A\nhi", "target": long_answer, "image": None}]
    )
    assert batch["input_ids"].shape[1] == 24 and (batch["labels"] != -100).sum() > 0


# --- ScienceQA --------------------------------------------------------------------------------------------------

SCIENCEQA_ROW = {
    "image": None,
    "question": "Which of these states is farthest north?",
    "choices": ["West Virginia", "Louisiana", "Arizona", "Oklahoma"],
    "answer": 0,
    "hint": "",
    "task": "closed choice",
    "grade": "grade2",
    "subject": "social science",
    "topic": "geography",
    "category": "Geography",
    "skill": "Read a map: cardinal directions",
    "lecture": "Maps have four cardinal directions.\nNorth is up.",
    "solution": "To find the answer, look at the compass rose.",
}


def test_scienceqa_qcm_ale_strings():
    example = scienceqa_example(SCIENCEQA_ROW)
    assert example["prompt"] == (
        "Image: N/A "
        "Question: Which of these states is farthest north?\n"
        "Context: N/A\n"
        "Options: (A) West Virginia (B) Louisiana (C) Arizona (D) Oklahoma\n"
        "Response:"
    )
    assert example["target"] == (
        "The answer is A. BECAUSE: Maps have four cardinal directions.\\nNorth is up. "
        "To find the answer, look at the compass rose."
    )
    with_context = scienceqa_example({**SCIENCEQA_ROW, "hint": "The map shows the states.", "image": "x.png"})
    assert with_context["prompt"].startswith("Image: <image> Question: ")
    assert "\nContext: The map shows the states.\n" in with_context["prompt"]


def test_scienceqa_fixture_dataset_and_table():
    rows = [
        {**SCIENCEQA_ROW},
        {
            **SCIENCEQA_ROW,
            "subject": "natural science",
            "grade": "grade8",
            "hint": "Some context.",
            "answer": 1,
        },
        {**SCIENCEQA_ROW, "subject": "language science", "grade": "grade10"},
    ]
    dataset = format_scienceqa(datasets.Dataset.from_list(rows))
    assert dataset["answer_letter"] == ["A", "B", "A"]
    records = [
        {
            "prediction": extract_letter("The answer is A. BECAUSE: ...", 4),
            "answer": "A",
            "subject": rows[0]["subject"],
            "hint": rows[0]["hint"],
            "has_image": False,
            "grade": rows[0]["grade"],
        },
        {
            "prediction": extract_letter("The answer is C.", 4),
            "answer": "B",
            "subject": rows[1]["subject"],
            "hint": rows[1]["hint"],
            "has_image": True,
            "grade": rows[1]["grade"],
        },
        {
            "prediction": extract_letter("I am not sure", 4),
            "answer": "A",
            "subject": rows[2]["subject"],
            "hint": rows[2]["hint"],
            "has_image": False,
            "grade": rows[2]["grade"],
        },
    ]
    table = scienceqa_table(records)
    assert table["SOC"] == 100.0 and table["NAT"] == 0.0 and table["LAN"] == 0.0
    assert table["TXT"] == 0.0 and table["IMG"] == 0.0 and table["NO"] == 50.0
    assert table["G1-6"] == 100.0 and table["G7-12"] == 0.0 and table["Avg"] == pytest.approx(33.33)
    assert table["unparsed"] == 1 and table["count"] == 3


# --- scorers ----------------------------------------------------------------------------------------------------


def test_answer_extraction_and_accuracy():
    assert extract_word(" Circle.", ["circle", "triangle"]) == "circle"
    assert extract_word("it is a triangle", ["circle", "triangle"]) == "triangle"
    assert extract_word("no idea", ["circle", "triangle"]) is None
    assert extract_letter("(B) because", 3) == "B" and extract_letter("D", 3) is None
    assert extract_described_answer(" blue circle. no", ["yes", "no"]) == "no"
    assert extract_described_answer(" red triangle. red", ["red", "blue"]) == "red"
    assert extract_described_answer(" blue circle", ["blue", "red"]) is None  # no answer after it
    assert extract_described_answer(" blue circle. maybe", ["yes", "no"]) is None
    result = accuracy_by_group(
        ["yes", None, "red", "circle"],
        ["yes", "no", "blue", "circle"],
        ["yes/no", "yes/no", "color", "shape"],
    )
    assert result["accuracy"] == 0.5 and result["unparsed"] == 1
    assert result["by_group"] == {"color": 0.0, "shape": 1.0, "yes/no": 0.5}


def test_easy_vqa_dataset_formats():
    dataset = load_easy_vqa("test", limit=20, seed=1)
    assert len(dataset) == 20 and set(dataset["question_type"]) <= {"yes/no", "color", "shape"}
    row = dataset[0]
    assert (
        row["prompt"] == f"Image: <image>\nQuestion: {row['question']}\nAnswer:"
        and row["target"] == f" {row['answer']}"
    )
    mc = load_easy_vqa("test", prompt_format="multiple_choice", limit=5, seed=1)[0]
    assert "Options: (A) " in mc["prompt"] and mc["target"].strip() in "ABCDEFGHIJKLM"
    assert mc["choices"][" ABCDEFGHIJKLM".index(mc["target"].strip()) - 1] == mc["answer"]


def test_easy_vqa_descriptions_from_the_images_own_questions():
    from mmadapters.data.easy_vqa import image_descriptions

    questions = [
        "what color is the triangle?",  # 0: blue triangle
        "is there not a circle?",  # 1: not a circle ...
        "is no blue shape present?",  # 1: ... and not blue: nothing positive
        "what is the red shape?",  # 2: red rectangle
        "is there a green shape?",  # 3: not green: nothing positive
        "is there not a gray shape?",  # 4: "no": it is gray ...
        "does the image contain a circle?",  # 4: ... and a circle
    ]
    answers = ["blue", "yes", "yes", "rectangle", "no", "no", "yes"]
    image_ids = [0, 1, 1, 2, 3, 4, 4]
    assert image_descriptions(questions, answers, image_ids) == {
        0: "blue triangle",
        2: "red rectangle",
        4: "gray circle",
    }


def test_easy_vqa_describe_format_agrees_with_the_answers():
    import easy_vqa

    from mmadapters.data.easy_vqa import COLORS, SHAPES, format_target

    assert set(COLORS) | set(SHAPES) | {"yes", "no"} == set(easy_vqa.get_answers())
    dataset = load_easy_vqa("train", prompt_format="describe")
    assert 0.85 * 38575 < len(dataset) < 38575  # images whose questions do not tell both are left out
    for row in dataset:
        colour, shape, answer = re.fullmatch(r" (\w+) (\w+)\. (\w+)", row["target"]).groups()
        assert colour in COLORS and shape in SHAPES and answer == row["answer"]
        assert row["prompt"] == f"Image: <image>\nQuestion: {row['question']}\nAnswer:"
        if row["question_type"] == "color":
            assert colour == row["answer"]
        elif row["question_type"] == "shape":
            assert shape == row["answer"]
    with pytest.raises(ValueError, match="needs the image's description"):
        format_target("yes", "describe", ["yes", "no"])
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        load_easy_vqa("test", prompt_format="described")


def test_easy_vqa_evaluation_reads_the_answer_after_the_description(monkeypatch):
    from mmadapters.evaluation import easy_vqa as evaluation

    dataset = load_easy_vqa("test", prompt_format="describe", limit=4, seed=0)
    requested = {}

    def fake_generate(model, processor, prompts, images, max_new_tokens, **kwargs):
        requested["max_new_tokens"] = max_new_tokens
        # right answer after a wrong description; a description alone; a right answer; a wrong answer
        wrong = next(choice for choice in dataset[3]["choices"] if choice != dataset[3]["answer"])
        return [
            f" green circle. {dataset[0]['answer']}",
            dataset[1]["target"].split(".")[0],
            dataset[2]["target"],
            f" red circle. {wrong}",
        ]

    monkeypatch.setattr(evaluation, "generate_answers", fake_generate)
    result = evaluation.evaluate_easy_vqa(None, None, dataset)
    assert requested["max_new_tokens"] == 8
    assert result["count"] == 4 and result["unparsed"] == 1 and result["accuracy"] == 0.5


def test_easy_vqa_evaluation_scores_open_rows_as_described_when_asked(monkeypatch):
    from mmadapters.evaluation import easy_vqa as evaluation

    dataset = load_easy_vqa("test", limit=40, seed=0)  # open format: targets are bare words
    dataset = dataset.select([i for i, kind in enumerate(dataset["question_type"]) if kind == "yes/no"][:3])
    answers = dataset["answer"]
    wrong = {"yes": "no", "no": "yes"}

    def fake_generate(model, processor, prompts, images, max_new_tokens, **kwargs):
        # right after a description; a bare right answer (no description); a right answer, then a wrong one
        return [f" red circle. {answers[0]}", f" {answers[1]}", f" {answers[2]}. {wrong[answers[2]]}"]

    monkeypatch.setattr(evaluation, "generate_answers", fake_generate)
    described = evaluation.evaluate_easy_vqa(None, None, dataset, answers_described=True)
    assert described["unparsed"] == 1 and described["accuracy"] == pytest.approx(1 / 3)
    plain = evaluation.evaluate_easy_vqa(None, None, dataset)  # read from the targets: open, first word
    assert plain["unparsed"] == 0 and plain["accuracy"] == 1.0


def test_llava_conversations(processor, tmp_path):
    save_image(tmp_path, "cat.png", (0, 0, 255))
    conversations = [
        {
            "image": "cat.png",
            "conversations": [
                {"from": "human", "value": "<image>\nwhat color?"},
                {"from": "gpt", "value": "blue"},
                {"from": "human", "value": "and the shape?"},
                {"from": "gpt", "value": "square"},
            ],
        }
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(conversations))
    dataset = load_llava_conversations(str(path), str(tmp_path), processor)
    assert dataset["target"] == ["blue", "square"]
    assert dataset["prompt"][0] == "<|user|>Image: <image>\nwhat color?</s><|assistant|>"
    assert dataset["prompt"][1].endswith("<|assistant|>blue</s><|user|>and the shape?</s><|assistant|>")

    lines = tmp_path / "data.jsonl"  # JSON Lines, and an image given as a list of one
    lines.write_text("\n".join(json.dumps({**c, "image": [c["image"]]}) for c in conversations * 2) + "\n")
    from_lines = load_llava_conversations(str(lines), str(tmp_path), processor)
    assert from_lines["target"] == ["blue", "square"] * 2 and from_lines["prompt"][:2] == dataset["prompt"]
    first_three = load_llava_conversations(str(lines), str(tmp_path), processor, limit=3)
    assert first_three["target"] == ["blue", "square", "blue"]  # `limit` counts examples (assistant turns)


LLAVA_TURNS = [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "red"}]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"image": ["a.png", "b.png"], "conversations": LLAVA_TURNS}, "conversation 1 names 2 images"),
        ({"image": "a.png", "conversations": [{"from": "human"}, LLAVA_TURNS[1]]}, "turn 0: a turn is"),
        ({"image": "a.png", "conversations": [LLAVA_TURNS[1]]}, "assistant turn comes before any user turn"),
        ({"conversations": LLAVA_TURNS}, "holds 1 <image> placeholder\\(s\\) for 0 image"),
        (
            {
                "image": "a.png",
                "conversations": [{"from": "human", "value": "<image> <image>"}, LLAVA_TURNS[1]],
            },
            "holds 2 <image> placeholder",
        ),
        ({"image": "a.png", "conversations": "hi"}, "no list of turns under 'conversations'"),
        ("just text", "conversation 1 is a str"),
    ],
    ids=[
        "two images",
        "turn without value",
        "assistant first",
        "placeholder without image",
        "two placeholders",
        "turns not a list",
        "not a record",
    ],
)
def test_llava_records_that_cannot_be_trained_on_are_refused_by_number(processor, tmp_path, record, message):
    save_image(tmp_path, "a.png", (0, 0, 255))
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"image": "a.png", "conversations": LLAVA_TURNS}, record]))
    with pytest.raises(ValueError, match=message):
        load_llava_conversations(str(path), str(tmp_path), processor)


def test_llava_files_that_hold_nothing_to_train_on_are_refused(processor, tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}]}]))
    with pytest.raises(ValueError, match="no assistant turn"):
        load_llava_conversations(str(path), str(tmp_path), processor)
    path.write_text('{"conversations": []}\nnot json\n')
    with pytest.raises(ValueError, match="neither JSON .* nor JSON Lines \\(line 2"):
        load_llava_conversations(str(path), str(tmp_path), processor)


# --- trainers ---------------------------------------------------------------------------------------------------


def adapter_weights(model):
    return {k: v.clone() for k, v in model.adapter_state_dict().items()}


def test_checkpoints_are_adapter_only_and_resume_matches_uninterrupted_run(
    tiny_backbones, processor, tmp_path
):
    dataset = toy_dataset(tmp_path)
    torch.manual_seed(0)
    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    trainer = make_trainer(model, processor, dataset, tmp_path / "full")
    trainer.train()
    uninterrupted = adapter_weights(model)
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert os.path.isfile(checkpoint / "mmadapters_model.safetensors") and not os.path.isfile(
        checkpoint / "model.safetensors"
    )
    assert set(load_file(checkpoint / "mmadapters_model.safetensors")) == set(uninterrupted)
    assert any(name.startswith("router/") for entry in trainer.state.log_history for name in entry)
    # The optimizer skips weight decay on biases and 1-D parameters.
    groups = trainer.optimizer.param_groups
    assert groups[0]["weight_decay"] == 0.02 and groups[1]["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in groups[1]["params"]) and all(p.ndim > 1 for p in groups[0]["params"])

    # "Kill" after the step-3 checkpoint: a fresh model resumes from it and must end where the first run ended.
    torch.manual_seed(123)  # a different initialisation: everything must come from the checkpoint
    resumed_model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    resumed = make_trainer(resumed_model, processor, dataset, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name, tensor in adapter_weights(resumed_model).items():
        torch.testing.assert_close(tensor, uninterrupted[name], rtol=1e-5, atol=1e-6, msg=name)
    # The final checkpoint loads as a model.
    LavinForConditionalGeneration.from_pretrained(tmp_path / "full" / "checkpoint-6")


def test_the_trainers_optimizer_choices_are_honoured(tiny_backbones, processor, tmp_path):
    """`optimizer_cls_and_kwargs` (a Trainer keyword) and `optim` choose the optimizer; LaVIN's decay groups
    (none on biases and 1-D parameters) hold with every choice."""
    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    dataset = toy_dataset(tmp_path, n=4)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    chosen = make_trainer(
        model, processor, dataset, tmp_path / "a", optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1})
    ).create_optimizer()
    by_name = make_trainer(
        model, processor, dataset, tmp_path / "b", training={"optim": "adagrad"}
    ).create_optimizer()
    assert type(chosen) is torch.optim.SGD and chosen.defaults["lr"] == 0.1
    assert type(by_name) is torch.optim.Adagrad
    for optimizer in (chosen, by_name):
        decay, no_decay = optimizer.param_groups
        assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
        assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
        assert {id(p) for group in optimizer.param_groups for p in group["params"]} == trainable


def test_remove_unused_columns_keeps_what_the_collator_reads(tiny_backbones, processor, tmp_path):
    """transformers' default `remove_unused_columns=True` kept only the forward's argument names, so the
    collator's raw columns (prompt, target, image) were dropped and training stopped with "No columns in the
    dataset match". Our Trainers keep the collator's columns and still drop the others."""
    from mmadapters.trainers import VisionLanguageCollator

    dataset = toy_dataset(tmp_path, n=4).map(lambda row: {"note": "unused"})
    seen = []

    class RecordingCollator(VisionLanguageCollator):
        def __call__(self, examples):
            seen.extend(sorted(example) for example in examples)
            return super().__call__(examples)

    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    trainer = make_trainer(
        model,
        processor,
        dataset,
        tmp_path / "out",
        max_steps=1,
        training={"remove_unused_columns": True, "save_strategy": "no"},
        data_collator=RecordingCollator(processor),
    )
    trainer.train()
    assert seen and all(keys == ["image", "prompt", "target"] for keys in seen)


def test_gradient_accumulation_matches_a_large_batch(tiny_backbones, processor, tmp_path):
    dataset = toy_dataset(tmp_path, n=8)
    results = []
    for batch_size, accumulation in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
        dropout_off(model)
        args = TrainingArguments(
            output_dir=str(tmp_path / f"ga{accumulation}"),
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            learning_rate=1e-2,
            use_cpu=True,
            report_to=[],
            remove_unused_columns=False,
            seed=0,
            data_seed=0,
            save_strategy="no",
            optim="sgd",
            lr_scheduler_type="constant",
        )
        LavinTrainer(
            model=model, args=args, train_dataset=dataset, data_collator=VisionLanguageCollator(processor)
        ).train()
        results.append(adapter_weights(model))
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_trainer_arguments_may_be_given_by_position(tiny_backbones, processor, tmp_path):
    """transformers' `Trainer(model, args, data_collator, train_dataset, ...)` by position: read as by name (DDP's
    unused-parameter detection set on a copy of the arguments, the model taken); too many, or one given twice, is
    refused by name."""
    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], max_steps=1)
    collator = VisionLanguageCollator(processor)
    trainer = LavinTrainer(model, args, collator, toy_dataset(tmp_path, n=4))
    assert trainer.model is model and trainer.data_collator is collator
    assert trainer.args.ddp_find_unused_parameters is True and args.ddp_find_unused_parameters is None
    trainer.train()
    assert trainer.state.global_step == 1
    with pytest.raises(TypeError, match=r"got multiple values for argument\(s\) \['args'\]"):
        LavinTrainer(model, args, args=args)
    with pytest.raises(TypeError, match="LavinTrainer\\(\\) takes at most .* positional arguments"):
        LavinTrainer(model, *([None] * 40))


def test_crome_trainer_honours_the_stage(tmp_path):
    from conftest import save_tiny_llm, save_tiny_vision

    from mmadapters import CromeProcessor

    llm, vision = save_tiny_llm(tmp_path / "llm"), save_tiny_vision(tmp_path / "vision")
    model = CromeForConditionalGeneration.from_backbones(
        llm, vision, qformer=tiny_qformer_config(), num_query_tokens=4
    )
    processor = CromeProcessor.from_backbones(llm, vision, num_image_tokens=model.config.num_image_tokens)
    dataset = toy_dataset(tmp_path, n=8).map(lambda row: {"prompt": row["prompt"].replace("Image: ", "")})
    dataset = dataset.map(lambda row: {"prompt": row["prompt"].replace("N/A\n", "")})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(
        model,
        processor,
        dataset,
        tmp_path / "crome",
        max_steps=2,
        trainer_class=CromeTrainer,
        stage="pretrain",
    )
    trainer.train()
    after = model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"adapter", "query_projection", "patch_projection"}
    saved = {
        k.split(".")[0]
        for k in load_file(tmp_path / "crome" / "checkpoint-2" / "mmadapters_model.safetensors")
    }
    assert saved == set(model.adapter_module_names())


def test_model_init_models_are_taken_as_given_models_are(tiny_backbones, tmp_path):
    """A Trainer's `model_init` (hyper-parameter search) builds models that are taken as a given model is:
    CROME's stage is set on each, a PeftModel around LaVIN is adopted (its LoRA and our adapters train)."""
    from peft import LoraConfig, get_peft_model

    from mmadapters import CromeProcessor

    crome, processor = seeded_model_and_processor("crome", tiny_backbones)
    dataset = toy_dataset(tmp_path, n=4)
    trainer = CromeTrainer(
        model_init=lambda: seeded_model_and_processor("crome", tiny_backbones)[0],
        args=TrainingArguments(str(tmp_path / "crome"), use_cpu=True, report_to=[]),
        train_dataset=dataset,
        data_collator=VisionLanguageCollator(
            CromeProcessor.from_backbones(*tiny_backbones, num_image_tokens=crome.config.num_image_tokens)
        ),
        stage="pretrain",
    )
    trains = {name.split(".")[0] for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trains == {"adapter", "query_projection", "patch_projection"}
    with pytest.raises(TypeError, match="CromeTrainer trains a CromeForConditionalGeneration, got Lavin"):
        CromeTrainer(
            model_init=lambda: LavinForConditionalGeneration.from_backbones(*tiny_backbones),
            args=TrainingArguments(str(tmp_path / "wrong"), use_cpu=True, report_to=[]),
        )

    def lavin_with_lora():
        lavin = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
        return get_peft_model(lavin, LoraConfig(r=2, target_modules=r".*language_model.*\.q_proj"))

    lavin_processor = LavinProcessor.from_backbones(*tiny_backbones)  # (this test gave it CROME's before)
    trainer = make_trainer(
        None, lavin_processor, dataset, tmp_path / "lavin", max_steps=1, model_init=lavin_with_lora
    )
    assert isinstance(trainer.model, LavinForConditionalGeneration)
    trains = {name.split(".")[0] for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert {"language_model", "llm_adapters", "projector"} <= trains  # the LoRA (in the LLM) and our adapters


def seeded_model_and_processor(which: str, tiny_backbones):
    """LaVIN or CROME (a tiny Q-Former) on the tiny backbones, built under seed 0, with its processor."""
    from mmadapters import CromeProcessor

    torch.manual_seed(0)
    if which == "lavin":
        model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
        return model, LavinProcessor.from_backbones(*tiny_backbones)
    model = CromeForConditionalGeneration.from_backbones(*tiny_backbones, qformer=tiny_qformer_config())
    processor = CromeProcessor.from_backbones(*tiny_backbones, num_image_tokens=model.config.num_image_tokens)
    return model, processor


@pytest.mark.parametrize("which", ["lavin", "crome"])
def test_supervised_logits_only_gives_the_same_loss_and_gradients(tiny_backbones, randomize_adapters, which):
    """Training steps project only the supervised positions onto the vocabulary: same loss, same gradients."""
    model, processor = seeded_model_and_processor(which, tiny_backbones)
    randomize_adapters(model)
    model.train()
    dropout_off(model)  # the two passes must see the same function
    generator = torch.Generator().manual_seed(0)
    image = (torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8).numpy()
    batch = processor(
        images=[[image], []],
        text=["<image>\nwhat color?" if which == "crome" else "Image: <image>\nwhat color?", "say hi"],
        answers=["red", "hi there friend"],
    )
    results = []
    for supervised_only in (False, True):
        model.zero_grad()
        out = model(**batch, supervised_logits_only=supervised_only, num_items_in_batch=torch.tensor(5))
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), out.logits.shape, grads))
    (full_loss, full_shape, full_grads), (kept_loss, kept_shape, kept_grads) = results
    torch.testing.assert_close(kept_loss, full_loss, atol=1e-6, rtol=1e-5)
    assert kept_shape[1] < full_shape[1]  # only the supervised positions were projected
    assert set(kept_grads) == set(full_grads)
    for name in full_grads:
        torch.testing.assert_close(kept_grads[name], full_grads[name], atol=1e-6, rtol=1e-4)


def smoothed_next_token_loss(logits, labels, epsilon):
    """transformers' LabelSmoother formula, each position scored against the next token."""
    log_probs = -torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    active = targets != -100
    nll = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[active].sum() / active.sum()
    smooth = log_probs.sum(-1)[active].sum() / (active.sum() * log_probs.shape[-1])
    return (1 - epsilon) * nll + epsilon * smooth


@pytest.mark.parametrize("which", ["lavin", "crome"])
def test_label_smoothing_scores_each_logit_against_its_next_token(tiny_backbones, tmp_path, which):
    """TrainingArguments(label_smoothing_factor=...): transformers' Trainer shifts labels only for models in its
    causal-LM mapping and scored our logits against the unshifted labels (each position against its own token).
    Ours: the smoothed next-token loss, in training steps (supervised logits only) and in evaluation."""
    model, processor = seeded_model_and_processor(which, tiny_backbones)
    dropout_off(model)  # training and evaluation steps must see the same function
    trainer = make_trainer(
        model,
        processor,
        toy_dataset(tmp_path, n=4),
        tmp_path / "run",
        training={"label_smoothing_factor": 0.1},
        trainer_class=CromeTrainer if which == "crome" else LavinTrainer,
    )
    image = (torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    prompt = "<image>\nwhat color?" if which == "crome" else "Image: <image>\nwhat color?"
    batch = processor(images=[[image], []], text=[prompt, "say hi"], answers=["red", "hi there friend"])
    with torch.no_grad():
        expected = smoothed_next_token_loss(model(**batch).logits, batch["labels"], 0.1)
        model.train()
        training_loss = trainer.compute_loss(model, dict(batch))
        model.eval()
        evaluation_loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
    torch.testing.assert_close(training_loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(evaluation_loss, expected, rtol=1e-5, atol=1e-6)
    assert outputs.logits.shape[1] == batch["input_ids"].shape[1]  # evaluation keeps every position's logits


def test_evaluation_gathers_logits_and_visual_tokens_not_the_vision_towers_states(tiny_backbones, tmp_path):
    """Trainer.predict / evaluate keep the logits (every position) and the visual tokens; the vision tower's states
    (`image_outputs`, one last hidden state per image) are not accumulated over the evaluation set."""
    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    processor = LavinProcessor.from_backbones(*tiny_backbones)
    dataset = toy_dataset(tmp_path, n=8)
    trainer = make_trainer(
        model, processor, dataset, tmp_path / "run", training={"per_device_eval_batch_size": 4}
    )
    logits, visual_tokens = trainer.predict(dataset).predictions
    images = sum(row["image"] is not None for row in dataset)
    assert logits.shape[:2] == (
        8,
        max(len(ids) for ids in VisionLanguageCollator(processor)(list(dataset))["input_ids"]),
    )
    assert visual_tokens.shape == (
        images,
        model.config.num_image_tokens,
        model.config.text_config.hidden_size,
    )


def test_trainer_steps_use_supervised_logits_only(tiny_backbones, tmp_path):
    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    processor = LavinProcessor.from_backbones(*tiny_backbones)
    seen = []
    forward = model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("supervised_logits_only", False))
        return forward(*args, **kwargs)

    model.forward = spy
    rows = [{"prompt": "Image: N/A\nsay hi", "target": "hi", "image": None}] * 4
    args = TrainingArguments(
        str(tmp_path / "run"),
        max_steps=1,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to=[],
        remove_unused_columns=False,
        save_strategy="no",
    )
    trainer = LavinTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        data_collator=VisionLanguageCollator(processor),
        processing_class=processor,
    )
    trainer.train()
    assert seen == [True]


def test_collator_takes_trl_conversational_rows(processor, tmp_path):
    """TRL's `messages` + `images` rows: the prompt is the chat before the last assistant turn, the target that
    turn; the supervision mask is checked against hand-written ids."""
    from mmadapters.trainers.collator import example_from_messages

    tok = processor.tokenizer
    image = save_image(tmp_path, "red.png", (255, 0, 0))
    rows = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
            ],
            "images": [image],
        },
        {
            "messages": [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi"}],
            "images": [],
        },
    ]
    batch = VisionLanguageCollator(processor)(rows)
    for row, example in enumerate(rows):
        prompt = processor.apply_chat_template(example["messages"][:1], add_generation_prompt=True)
        assert example_from_messages(example, processor)["prompt"] == prompt
        expanded = prompt.replace("<image>", "<image>" * processor.num_image_tokens)
        prompt_ids = tok(expanded)["input_ids"]
        answer = example["messages"][1]["content"]
        answer = answer if isinstance(answer, str) else answer[0]["text"]
        expected = (
            [-100] * len(prompt_ids) + tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        )
        labels = batch["labels"][row].tolist()
        assert labels[: len(expected)] == expected and set(labels[len(expected) :]) <= {-100}
    assert batch["pixel_values"].shape[0] == 1  # one image, for the first row
    with pytest.raises(ValueError, match="last turn of 'messages' must be the assistant's"):
        VisionLanguageCollator(processor)([{"messages": rows[1]["messages"][:1]}])
    with pytest.raises(ValueError, match="1 image.s. in 'images' but 0"):
        VisionLanguageCollator(processor)([{**rows[1], "images": [image]}])


@pytest.mark.parametrize("kind", ["lavin", "crome"])
def test_group_by_length_counts_raw_rows_as_the_collator_builds_them(tiny_backbones, tmp_path, kind):
    """`train_sampling_strategy="group_by_length"` on prompt/target/image rows (and TRL's messages rows):
    transformers infers lengths from `input_ids` only and stopped with "Can only automatically infer lengths"; our
    Trainers count each row's sample (here exactly the collator's token count) and a length column of the data
    set's own is taken as given."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from mmadapters import CromeProcessor

    model_class = LavinForConditionalGeneration if kind == "lavin" else CromeForConditionalGeneration
    model = model_class.from_backbones(*tiny_backbones)
    processor = (LavinProcessor if kind == "lavin" else CromeProcessor).from_model(model)
    rows = toy_dataset(tmp_path, n=12).to_list()
    rows[0]["prompt"] += " and what is written in the corner of it, if anything at all?"
    rows[1]["target"] += " or maybe purple, it is hard to say"
    collator = VisionLanguageCollator(processor)
    dataset = datasets.Dataset.from_list(rows)
    built = [int(collator([row])["attention_mask"].sum()) for row in rows]
    assert collator.sample_lengths(dataset) == built and len(set(built)) >= 3
    conversation = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        ],
        "images": [rows[0]["image"]],
    }
    messages = datasets.Dataset.from_list([conversation])
    assert collator.sample_lengths(messages) == [int(collator([conversation])["attention_mask"].sum())]

    trainer_class = LavinTrainer if kind == "lavin" else CromeTrainer
    training = {"train_sampling_strategy": "group_by_length", "save_strategy": "no"}
    trainer = make_trainer(
        model,
        processor,
        dataset,
        tmp_path / "out",
        max_steps=2,
        training=training,
        trainer_class=trainer_class,
    )
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler) and sampler.lengths == built
    counted = []
    original = collator.sample_lengths
    trainer.data_collator.sample_lengths = lambda rows: counted.append(len(rows)) or original(rows)
    for _ in range(2):  # an evaluation set is counted once, not at every evaluation
        assert trainer._get_eval_sampler(messages).lengths == collator.sample_lengths(messages)
    assert counted == [1]
    trainer.data_collator.sample_lengths = original
    trainer.train()
    given = dataset.add_column("length", list(range(len(rows))))
    trainer = make_trainer(
        model,
        processor,
        given,
        tmp_path / "out2",
        max_steps=1,
        training=training,
        trainer_class=trainer_class,
    )
    assert trainer._get_train_sampler().lengths == list(range(len(rows)))
    trainer.train()


def test_text_distillation_is_zero_for_the_bare_llm_and_trains_towards_it(
    tiny_backbones, processor, tmp_path
):
    from mmadapters.trainers.trainer import text_distillation_loss

    torch.manual_seed(0)
    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    batch = processor(text=["Image: N/A\nthe capital of", "Image: N/A\nsay hi"])
    # Zero-initialised experts: LaVIN is the bare LLM, so the divergence is zero.
    assert text_distillation_loss(model, batch["input_ids"], batch["attention_mask"]).item() == pytest.approx(
        0, abs=1e-6
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and "expert" in name:
                parameter.normal_(0, 0.3)
    drifted = text_distillation_loss(model, batch["input_ids"], batch["attention_mask"])
    assert drifted.item() > 1e-4
    drifted.backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "expert" in n
    )
    # The Trainer adds it on text-only rows (one process only; a negative weight is refused).
    dataset = toy_dataset(tmp_path, n=6)
    trainer = make_trainer(model, processor, dataset, tmp_path / "distil", max_steps=1, text_distillation=1.0)
    inputs = VisionLanguageCollator(processor)([dataset[i] for i in range(3)])  # rows 0-1 image, row 2 text
    model.train()
    dropout_off(model)
    with_distillation = trainer.compute_loss(model, dict(inputs)).item()
    trainer.text_distillation = 0.0
    without = trainer.compute_loss(model, dict(inputs)).item()
    assert with_distillation > without
    with pytest.raises(ValueError, match="loss weight"):
        make_trainer(model, processor, dataset, tmp_path / "bad", text_distillation=-1.0)


def test_unsupervised_text_only_samples_train_by_distillation_alone(
    tiny_backbones, processor, tmp_path, randomize_adapters
):
    from mmadapters.trainers.trainer import text_distillation_loss

    dataset = toy_dataset(tmp_path, n=6)  # rows 0-1 and 3-4 image, rows 2 and 5 text only
    rows = [dataset[i] for i in range(6)]
    supervised = VisionLanguageCollator(processor)(rows)
    collator = VisionLanguageCollator(processor, supervise_text_only=False)
    batch = collator(rows)
    assert torch.equal(batch["input_ids"], supervised["input_ids"])
    for index, row in enumerate(rows):
        if row["image"] is None:
            assert (batch["labels"][index] == -100).all() and (supervised["labels"][index] != -100).any()
        else:
            assert torch.equal(batch["labels"][index], supervised["labels"][index])

    torch.manual_seed(0)
    model = randomize_adapters(LavinForConditionalGeneration.from_backbones(*tiny_backbones), std=0.3)
    dropout_off(model)
    model.train()
    trainer = make_trainer(model, processor, dataset, tmp_path / "distil", max_steps=1, text_distillation=2.0)
    # A batch of unsupervised text-only samples: the loss is the distillation alone (no 0 / 0 cross-entropy).
    text_batch = collator([rows[2], rows[5]])
    loss = trainer.compute_loss(model, dict(text_batch))
    expected = 2.0 * text_distillation_loss(model, text_batch["input_ids"], text_batch["attention_mask"])
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "expert" in n
    )
    # A mixed batch: the image rows' cross-entropy plus the text rows' distillation.
    mixed = dict(collator(rows[:3]))
    image_only = {key: value[:2] for key, value in mixed.items() if key != "pixel_values"}
    image_only["pixel_values"] = mixed["pixel_values"]
    trainer.text_distillation = 0.0
    cross_entropy = trainer.compute_loss(model, image_only).item()
    trainer.text_distillation = 2.0
    text_part = (
        2.0 * text_distillation_loss(model, mixed["input_ids"][2:], mixed["attention_mask"][2:]).item()
    )
    assert trainer.compute_loss(model, mixed).item() == pytest.approx(cross_entropy + text_part, rel=1e-4)


def test_quickstart_refuses_text_samples_that_would_train_nothing(tmp_path):
    from mmadapters.quickstart import QuickstartSettings, run_quickstart

    with pytest.raises(ValueError, match="text-only samples would train nothing"):
        run_quickstart(
            tmp_path,
            QuickstartSettings(text_fraction=0.1, text_answer_loss=False, text_distillation=0.0),
            log=lambda *_: None,
        )


def test_after_bf16_training_the_quickstart_unwraps_autocast_so_evaluations_run_in_float32(
    tiny_backbones, processor, tmp_path
):
    # accelerate wraps the model's forward in autocast for bf16 training and leaves it so; the quickstart unwraps
    # it (keep_fp32_wrapper=False) before its float32 evaluations, as this checks.
    from mmadapters.quickstart import QuickstartSettings, training_arguments

    torch.manual_seed(0)
    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    dataset = toy_dataset(tmp_path, n=4)
    settings = QuickstartSettings(train_steps=1, batch_size=2, bf16=True)
    args = training_arguments(
        str(tmp_path / "out"), settings, disable_tqdm=True, train_sampling_strategy="random"
    )
    assert args.bf16
    trainer = LavinTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=VisionLanguageCollator(processor),
        processing_class=processor,
    )
    trainer.train()
    inputs = processor(text=["Image: N/A\nthe capital of"])
    model.eval()
    with torch.no_grad():
        wrapped = model(**inputs).logits
        model = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        unwrapped = model(**inputs).logits
        model.save_pretrained(tmp_path / "saved")
        reloaded = LavinForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()(**inputs).logits
    assert not hasattr(model, "_original_forward")
    torch.testing.assert_close(unwrapped, reloaded, rtol=0, atol=1e-6)  # float32, as a reloaded checkpoint
    assert (wrapped - unwrapped).abs().max() > 1e-4  # what the autocast wrapper had left in place
