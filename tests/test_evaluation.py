"""Benchmarks: MME and MMBench scorers on hand-made fixtures (scores computed by hand), the ScienceQA / MME /
MMBench tasks from local copies in the Hub layout, `mmadapters eval --task`, and batched evaluation equal to
one-by-one evaluation for both models."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from mmadapters.evaluation import tasks
from mmadapters.evaluation.benchmarks import mmbench_circular, mme_scores, mme_yes_no, rotate_options
from mmadapters.processing.images import load_image


def test_mme_scores_by_hand():
    records = [
        # existence: image 1 both right, image 2 one right -> acc 3/4 = 75, acc+ 1/2 = 50, score 125
        {"category": "existence", "image_id": "1", "prediction": "yes", "answer": "Yes"},
        {"category": "existence", "image_id": "1", "prediction": "no", "answer": "No"},
        {"category": "existence", "image_id": "2", "prediction": "yes", "answer": "Yes"},
        {"category": "existence", "image_id": "2", "prediction": None, "answer": "No"},
        # code_reasoning: image 3 both wrong, image 4 both right -> acc 50, acc+ 50, score 100
        {"category": "code_reasoning", "image_id": "3", "prediction": "no", "answer": "Yes"},
        {"category": "code_reasoning", "image_id": "3", "prediction": "yes", "answer": "No"},
        {"category": "code_reasoning", "image_id": "4", "prediction": "yes", "answer": "Yes"},
        {"category": "code_reasoning", "image_id": "4", "prediction": "no", "answer": "No"},
    ]
    scores = mme_scores(records)
    assert scores["subtasks"]["existence"] == {"acc": 75.0, "acc+": 50.0, "score": 125.0}
    assert scores["subtasks"]["code_reasoning"] == {"acc": 50.0, "acc+": 50.0, "score": 100.0}
    assert (scores["perception"], scores["cognition"], scores["count"], scores["unparsed"]) == (
        125.0,
        100.0,
        8,
        1,
    )
    assert mme_yes_no("Yes, there is.") == "yes" and mme_yes_no("No.") == "no" and mme_yes_no("maybe") is None
    with pytest.raises(ValueError, match="Unknown MME subtask"):
        mme_scores([{"category": "vibes", "image_id": "1", "prediction": "yes", "answer": "Yes"}])


def test_mmbench_circular_by_hand():
    assert rotate_options(["a", "b", "c"], 0, 1) == (["b", "c", "a"], 2)
    records = [
        # q1 (3 options): every rotation right -> passes
        *({"question_id": "1", "category": "ocr", "prediction": a, "answer": a} for a in (0, 2, 1)),
        # q2 (2 options): the second rotation wrong -> fails, although one rotation was right
        {"question_id": "2", "category": "ocr", "prediction": 1, "answer": 1},
        {"question_id": "2", "category": "ocr", "prediction": 1, "answer": 0},
        # q3: unparsed in one rotation -> fails
        {"question_id": "3", "category": "logic", "prediction": None, "answer": 0},
        {"question_id": "3", "category": "logic", "prediction": 1, "answer": 1},
    ]
    scores = mmbench_circular(records)
    assert scores["accuracy"] == pytest.approx(100 / 3, abs=0.01)
    assert scores["by_category"] == {"logic": 0.0, "ocr": 50.0}
    assert (scores["count"], scores["unparsed"]) == (3, 1)


def test_mmbench_rotations_prompt_text():
    row = {"index": 7, "question": "What is it?", "hint": float("nan"), "A": "cat", "B": "dog", "C": None,
           "answer": "B", "category": "x"}  # fmt: skip
    rotations = tasks.mmbench_rotations(row)
    assert [r["answer"] for r in rotations] == [1, 0]
    assert rotations[1]["text"] == (
        "What is it?\nA. dog\nB. cat\nAnswer with the option's letter from the given choices directly."
    )


def image(color):
    return Image.new("RGB", (32, 32), color)


def write_hub_layout(folder, split, rows, features=None):
    """A local copy in the Hub's parquet layout: data/{split}-00000-of-00001.parquet."""
    path = folder / "data" / f"{split}-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return folder


SQA_FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")),
        "answer": datasets.Value("int64"),
        "hint": datasets.Value("string"),
        "subject": datasets.Value("string"),
        "grade": datasets.Value("string"),
        "lecture": datasets.Value("string"),
        "solution": datasets.Value("string"),
    }
)


def scienceqa_rows():
    base = {"lecture": "", "solution": "", "choices": ["red", "blue"]}
    return [
        {**base, "image": image("red"), "question": "Color?", "answer": 0, "hint": "", "subject": "natural science",
         "grade": "grade2"},
        {**base, "image": None, "question": "Which?", "answer": 1, "hint": "A map.", "subject": "social science",
         "grade": "grade8"},
        {**base, "image": None, "question": "Word?", "answer": 0, "hint": "", "subject": "language science",
         "grade": "grade3"},
    ]  # fmt: skip


def test_scienceqa_task_from_a_local_hub_layout_copy(tmp_path, monkeypatch):
    folder = write_hub_layout(tmp_path / "sqa", "test", scienceqa_rows(), SQA_FEATURES)
    write_hub_layout(tmp_path / "sqa", "train", scienceqa_rows()[:1], SQA_FEATURES)
    seen = {}

    def fake_generate(model, processor, prompts, images, **kwargs):
        seen["prompts"], seen["images"] = list(prompts), list(images)
        return ["The answer is A. BECAUSE", "The answer is A.", "no idea"]  # right, wrong, unparsed

    monkeypatch.setattr(tasks, "generate_answers", fake_generate)
    result = tasks.run_task("scienceqa", None, None, data=str(folder), split="test")
    assert seen["prompts"][0].startswith("Image: <image> Question: Color?")
    assert seen["prompts"][1].startswith("Image: N/A Question: Which?\nContext: A map.")
    assert isinstance(seen["images"][0], Image.Image) and seen["images"][1] is None
    # By hand: NAT 1/1, SOC 0/1, LAN 0/1 (unparsed); TXT (with context) 0/1, IMG 1/1, NO 0/1; G1-6 1/2, G7-12 0/1.
    assert result["metrics"] == {"NAT": 100.0, "SOC": 0.0, "LAN": 0.0, "TXT": 0.0, "IMG": 100.0, "NO": 0.0,
                                 "G1-6": 50.0, "G7-12": 0.0, "Avg": 33.33}  # fmt: skip
    assert (result["count"], result["unparsed"], result["split"]) == (3, 1, "test")
    with pytest.raises(FileNotFoundError, match="split 'validation'"):
        tasks.run_task("scienceqa", None, None, data=str(folder), split="validation")


def write_official_scienceqa(folder, split="test"):
    """`scienceqa_rows` in ScienceQA's official layout (as LaVIN's data/ folder): problems.json, pid_splits.json
    and images/<split>/<pid>/image.png."""
    problems = {}
    for number, row in enumerate(scienceqa_rows()):
        pid = str(100 + number)
        problems[pid] = {**row, "image": None if row["image"] is None else "image.png", "split": split}
        if row["image"] is not None:
            (folder / "images" / split / pid).mkdir(parents=True)
            row["image"].save(folder / "images" / split / pid / "image.png")
    (folder / "problems.json").write_text(json.dumps(problems))
    (folder / "pid_splits.json").write_text(json.dumps({split: sorted(problems), "train": []}))
    return folder


def test_scienceqa_task_from_a_copy_in_the_official_layout_scores_as_from_the_hub_layout(
    tmp_path, monkeypatch
):
    official = write_official_scienceqa(tmp_path / "data")
    hub = write_hub_layout(tmp_path / "sqa", "test", scienceqa_rows(), SQA_FEATURES)
    seen = []

    def fake_generate(model, processor, prompts, images, **kwargs):
        seen.append(
            (list(prompts), [None if image is None else load_image(image).tobytes() for image in images])
        )
        return ["The answer is A. BECAUSE", "The answer is A.", "no idea"]

    monkeypatch.setattr(tasks, "generate_answers", fake_generate)
    from_official = tasks.run_task("scienceqa", None, None, data=str(official), split="test")
    from_hub = tasks.run_task("scienceqa", None, None, data=str(hub), split="test")
    assert seen[0] == seen[1]  # the same prompts and the same images
    assert from_official["metrics"] == from_hub["metrics"] and from_official["metrics"]["Avg"] == 33.33
    assert tasks.load_task_data("scienceqa", str(official), "test", limit=2)["pid"] == ["100", "101"]

    with pytest.raises(ValueError, match="no split 'validation'; it has \\['test', 'train'\\]"):
        tasks.run_task("scienceqa", None, None, data=str(official), split="validation")
    (official / "images" / "test" / "100" / "image.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 image\\(s\\) of split 'test' are missing, e.g. .*100"):
        tasks.load_task_data("scienceqa", str(official), "test")


def test_mme_and_mmbench_tasks_from_local_copies(tmp_path, monkeypatch):
    mme_rows = [
        {"question_id": "a.jpg", "image": image("red"), "question": "Is it red? Please answer yes or no.",
         "answer": "Yes", "category": "color"},
        {"question_id": "a.jpg", "image": image("red"), "question": "Is it blue? Please answer yes or no.",
         "answer": "No", "category": "color"},
    ]  # fmt: skip
    mme = write_hub_layout(tmp_path / "mme", "test", mme_rows)
    monkeypatch.setattr(tasks, "generate_answers", lambda *a, **k: ["Yes", "Yes"])
    result = tasks.run_task("mme", None, FakeProcessor(), data=str(mme))
    assert result["metrics"] == {"perception": 50.0, "cognition": 0, "color score": 50.0}

    mmbench_rows = [{"index": 1, "question": "Pet?", "hint": None, "A": "cat", "B": "dog", "C": None, "D": None,
                     "answer": "A", "category": "animals", "image": image("blue")}]  # fmt: skip
    mmbench = write_hub_layout(tmp_path / "mmbench", "dev", mmbench_rows)
    monkeypatch.setattr(tasks, "generate_answers", lambda model, processor, prompts, *a, **k: ["A", "B"])
    result = tasks.run_task("mmbench", None, FakeProcessor(), data=str(mmbench))
    assert result["metrics"] == {"circular accuracy": 100.0, "circular accuracy (animals)": 100.0}


class FakeProcessor:
    """Renders one user turn as the official LaVIN instruction layout (what a converted checkpoint's does)."""

    def apply_chat_template(self, messages, add_generation_prompt):
        content = messages[0]["content"]
        head = "Image: <image> " if content[0]["type"] == "image" else "Image: N/A "
        return head + "Instruction: " + content[-1]["text"] + "\nResponse: "


def test_eval_command_runs_scienceqa_on_a_tiny_checkpoint(tiny_backbones, tmp_path, capsys):
    from mmadapters import LavinForConditionalGeneration, LavinProcessor
    from mmadapters.cli import main

    checkpoint = tmp_path / "ckpt"
    LavinForConditionalGeneration.from_backbones(*tiny_backbones).save_pretrained(
        checkpoint, processor=LavinProcessor.from_backbones(*tiny_backbones)
    )
    folder = write_hub_layout(tmp_path / "sqa", "test", scienceqa_rows(), SQA_FEATURES)
    code = main(["eval", str(checkpoint), "--task", "scienceqa", "--data", str(folder), "--batch-size", "2"])
    assert code == 0
    assert '"task": "scienceqa"' in capsys.readouterr().out
    saved = json.loads((checkpoint / "eval_scienceqa.json").read_text())
    assert (
        saved["task"] == "scienceqa"
        and saved["count"] == 3
        and set(saved["metrics"]) >= {"Avg", "NAT", "IMG"}
    )
    assert len(saved["generations"]) == 3
    card_record = json.loads((checkpoint / "eval_results.json").read_text())
    assert card_record["metrics"] == saved["metrics"]


@pytest.mark.parametrize("kind", ["lavin", "crome"])
def test_batched_evaluation_equals_one_by_one(kind, tiny_backbones, randomize_adapters):
    """Greedy answers of a mixed batch (image and text-only questions) equal those of one question at a time."""
    from conftest import tiny_qformer_config

    from mmadapters import (
        CromeForConditionalGeneration,
        CromeProcessor,
        LavinForConditionalGeneration,
        LavinProcessor,
    )
    from mmadapters.evaluation import generate_answers

    torch.manual_seed(0)
    if kind == "lavin":
        model = randomize_adapters(LavinForConditionalGeneration.from_backbones(*tiny_backbones))
        processor = LavinProcessor.from_backbones(*tiny_backbones)
        head_image, head_text = "Image: <image> ", "Image: N/A "
    else:
        model = CromeForConditionalGeneration.from_backbones(
            *tiny_backbones, qformer=tiny_qformer_config(), num_query_tokens=4
        )
        with torch.no_grad():
            model.adapter.up.weight.normal_(0, 0.3)
        processor = CromeProcessor.from_backbones(
            *tiny_backbones, num_image_tokens=model.config.num_image_tokens
        )
        head_image, head_text = "<image> ", ""
    rng = np.random.default_rng(0)
    images = [(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(3)]
    prompts = [head_text + "the capital of", head_image + "what color?", head_image + "what shape is it here?",
               head_text + "say hi", head_image + "color?"]  # fmt: skip
    per_prompt_images = [None, images[0], images[1], None, images[2]]
    batched = generate_answers(model, processor, prompts, per_prompt_images, batch_size=5, max_new_tokens=6)
    alone = generate_answers(model, processor, prompts, per_prompt_images, batch_size=1, max_new_tokens=6)
    assert batched == alone
    assert len(set(batched)) > 1  # the answers differ between questions: the comparison is not vacuous
