"""The lmms-eval plugin (`--model lavin` / `--model crome`), in process on a tiny checkpoint with a hand-made task:
found through lmms-eval's entry points, answers equal to `mmadapters eval`'s, log-likelihoods consistent.
lmms-eval's CLI and its benchmark data need the Hub; the README gives the command."""

from __future__ import annotations

import math

import pytest
from PIL import Image

pytest.importorskip("lmms_eval.api.model")

from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.models.registry_v2 import ModelRegistryV2  # noqa: E402

from mmadapters import LavinForConditionalGeneration, LavinProcessor  # noqa: E402
from mmadapters.evaluation import generate_answers  # noqa: E402
from mmadapters.integrations.lmms_eval import CromeLMM, LavinLMM  # noqa: E402

DOCS = [
    {"image": Image.new("RGB", (32, 32), "red"), "question": "What color is it?"},
    {"image": None, "question": "What is the capital of France?"},
    {"image": Image.new("RGB", (32, 32), "blue"), "question": "Which color?"},
]


@pytest.fixture(scope="module")
def checkpoint(tiny_backbones, tmp_path_factory):
    import torch

    torch.manual_seed(0)
    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and "expert" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    folder = tmp_path_factory.mktemp("lavin")
    model.save_pretrained(folder, processor=LavinProcessor.from_backbones(*tiny_backbones))
    return str(folder)


def doc_to_visual(doc):
    return [doc["image"]] if doc["image"] is not None else []


def instance(kind, arguments, index):
    return Instance(
        kind, arguments, idx=index, metadata={"task": "colors", "doc_id": arguments[3], "repeats": 1}
    )


def requests(gen_kwargs):
    return [
        instance("generate_until", (doc["question"], gen_kwargs, doc_to_visual, i, "colors", "test"), i)
        for i, doc in enumerate(DOCS)
    ]


def test_entry_points_register_both_models():
    registry = ModelRegistryV2()
    registry.load_entrypoint_manifests()
    assert registry.get_manifest("lavin").simple_class_path.endswith("LavinLMM")
    assert registry.get_manifest("crome").simple_class_path.endswith("CromeLMM")


def test_generate_until_equals_mmadapters_own_evaluation(checkpoint):
    lmm = LavinLMM(pretrained=checkpoint, batch_size=2, max_new_tokens=5)
    lmm.task_dict = {"colors": {"test": DOCS}}
    answers = lmm.generate_until(requests({"max_new_tokens": 5, "until": ["\n\n"]}))
    prompts = [lmm._prompt(doc["question"], int(doc["image"] is not None)) for doc in DOCS]
    own = generate_answers(lmm.model, lmm.processor, prompts, [d["image"] for d in DOCS], max_new_tokens=5)
    assert answers == [text.split("\n\n")[0] for text in own]
    # `until` cuts the answer at the task's stop string (here: the second half of the first answer).
    assert own[0], "the tiny model answered nothing: the comparison would be vacuous"
    marker = own[0][len(own[0]) // 2 :]
    cut = lmm.generate_until(requests({"max_new_tokens": 5, "until": [marker]}))
    assert cut[0] == own[0][: len(own[0]) // 2] or cut[0] == own[0].split(marker)[0]
    assert len(cut[0]) < len(own[0])


def test_the_tasks_generation_options_are_honoured(checkpoint, caplog):
    """num_beams, sampling (temperature, top_p) and other transformers options reach generate; a key that is not a
    generation option (another model's setting) is logged, not passed."""
    import torch

    lmm = LavinLMM(pretrained=checkpoint, batch_size=3)
    lmm.task_dict = {"colors": {"test": DOCS}}
    task = {"max_new_tokens": 5, "temperature": 0, "top_p": 1.0, "num_beams": 3, "do_sample": False}
    beams = lmm.generate_until(requests({**task, "repetition_penalty": 1.5, "image_aspect_ratio": "pad"}))
    prompts = [lmm._prompt(doc["question"], int(doc["image"] is not None)) for doc in DOCS]
    inputs = lmm._inputs(prompts, [doc_to_visual(doc) for doc in DOCS])
    expected = lmm.model.generate(
        **inputs, max_new_tokens=5, num_beams=3, repetition_penalty=1.5, do_sample=False
    )
    decoded = lmm.processor.batch_decode(
        expected[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    assert beams == decoded
    assert "'image_aspect_ratio' is not a transformers generation option" in caplog.text
    sampled = {**task, "num_beams": 1, "temperature": 5.0, "top_p": 0.9}
    torch.manual_seed(0)
    first = lmm.generate_until(requests(sampled))
    torch.manual_seed(0)
    assert lmm.generate_until(requests(sampled)) == first
    greedy = lmm.generate_until(requests({**task, "num_beams": 1}))
    assert first != greedy  # a hot temperature samples something else


def test_loglikelihood(checkpoint):
    lmm = LavinLMM(pretrained=checkpoint)
    lmm.task_dict = {"colors": {"test": DOCS}}
    short, longer = lmm.loglikelihood(
        [
            instance("loglikelihood", (DOCS[0]["question"], " red", doc_to_visual, 0, "colors", "test"), 0),
            instance(
                "loglikelihood", (DOCS[0]["question"], " red car", doc_to_visual, 0, "colors", "test"), 1
            ),
        ]
    )
    assert math.isfinite(short[0]) and short[0] < 0 and isinstance(short[1], bool)
    assert longer[0] < short[0]  # one more token, one more negative log-probability


def test_wrong_model_and_unknown_arguments_are_refused(checkpoint):
    with pytest.raises(ValueError, match="is a lavin checkpoint; use --model lavin"):
        CromeLMM(pretrained=checkpoint)
    with pytest.raises(TypeError, match="Unknown model_args \\['temperatur'\\]"):
        LavinLMM(pretrained=checkpoint, temperatur=0.2)


def test_each_process_of_a_multi_process_run_takes_its_own_gpu(monkeypatch):
    """lmms-eval shards the requests over the processes of `accelerate launch -m lmms_eval`; device=cuda must
    then mean this process's GPU, not cuda:0 for all of them."""
    from mmadapters.integrations.lmms_eval import device_of_this_process

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert device_of_this_process("cuda") == "cuda"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert device_of_this_process("cuda") == "cuda:3"
    assert device_of_this_process("cuda:1") == "cuda:1" and device_of_this_process("cpu") == "cpu"


def test_backbones_elsewhere_are_model_args(checkpoint, tiny_backbones, tmp_path):
    """A checkpoint whose backbone folder is not on this machine: `text_model` / `vision_model` say where it is."""
    import json
    import shutil

    moved = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, moved)
    config = json.loads((moved / "config.json").read_text())
    config["text_backbone"]["name_or_path"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(config))
    with pytest.raises(OSError, match="text_model"):
        LavinLMM(pretrained=str(moved))
    answers = []
    for lmm in (
        LavinLMM(pretrained=str(moved), text_model=tiny_backbones[0]),
        LavinLMM(pretrained=checkpoint),
    ):
        lmm.task_dict = {"colors": {"test": DOCS}}
        answers.append(lmm.generate_until(requests({"max_new_tokens": 4})))
    assert answers[0] == answers[1] and any(answers[0])
    from conftest import save_tiny_llm

    other = save_tiny_llm(tmp_path / "other", seed=5)
    with pytest.raises(ValueError, match="different weights"):
        LavinLMM(pretrained=str(moved), text_model=other)
    LavinLMM(
        pretrained=str(moved), text_model=other, ignore_backbone_mismatch="True"
    )  # as lmms-eval passes it
    with pytest.raises(ValueError, match="must be true or false"):
        LavinLMM(pretrained=str(moved), text_model=other, ignore_backbone_mismatch="maybe")
