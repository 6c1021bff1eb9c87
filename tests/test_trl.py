"""`model.base_model` (the model without its LM head) and TRL's SFTTrainer, which applies the head itself."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch
from conftest import (
    tiny_qformer_config,
    tiny_sample_inputs,
    toy_dataset,
)
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from mmadapters import (
    CromeForConditionalGeneration,
    CromeProcessor,
    LavinForConditionalGeneration,
    LavinProcessor,
)
from mmadapters.checkpoint_files import ADAPTER_WEIGHTS_NAME
from mmadapters.modeling.transformers_compat import cache_of
from mmadapters.trainers import CromeTrainer, LavinTrainer, VisionLanguageCollator


@pytest.fixture(scope="module")
def backbones(backbones_by_llm):
    return backbones_by_llm


def build(backbones, kind: str, llm: str = "llama"):
    """LaVIN or CROME (around the `llm` backbone) with adapters that change the output."""
    torch.manual_seed(0)
    if kind == "lavin":
        model = LavinForConditionalGeneration.from_backbones(backbones[llm], backbones["vision"])
        processor = LavinProcessor.from_backbones(backbones[llm], backbones["vision"])
    else:
        model = CromeForConditionalGeneration.from_backbones(
            backbones[llm], backbones["vision"], qformer=tiny_qformer_config(), num_query_tokens=4
        )
        processor = CromeProcessor.from_backbones(
            backbones[llm], backbones["vision"], num_image_tokens=model.config.num_image_tokens
        )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval(), processor


@pytest.mark.parametrize("kind", ["lavin", "crome"])
def test_base_model_returns_the_hidden_states_the_lm_head_turns_into_the_logits(backbones, kind):
    model, processor = build(backbones, kind)
    inputs = tiny_sample_inputs(processor)
    with torch.no_grad():
        expected = model(**inputs)
        body = model.base_model(**inputs)
        cached = model.base_model(**inputs, use_cache=True)
    assert body.last_hidden_state.shape == (*inputs["input_ids"].shape, model.config.text_config.hidden_size)
    logits = model.get_output_embeddings()(body.last_hidden_state)
    torch.testing.assert_close(logits, expected.logits, rtol=1e-5, atol=1e-5)
    assert cache_of(cached).get_seq_length() == inputs["input_ids"].shape[1]
    # the towers and the module tree are the model's, as in transformers' bodies; the rest is the model's alone
    body_view = model.base_model
    assert body_view.vision_tower is model.vision_tower and body_view.language_model is model.language_model
    assert dict(body_view.named_parameters()) == dict(model.named_parameters())
    assert not hasattr(body_view, "generate") and not hasattr(body_view, "get_encoder")
    # transformers' lookups through base_model find what they found before
    assert model.get_decoder() is model.language_model.get_decoder() and model.get_encoder() is model
    assert isinstance(model.supports_tp_plan, bool) and isinstance(model.supports_pp_plan, bool)

    with pytest.raises(ValueError, match="computes no loss: call the model itself with `labels`"):
        model.base_model(**inputs, labels=inputs["input_ids"])


def test_base_model_of_an_encoder_decoder_crome_is_refused(backbones):
    model, processor = build(backbones, "crome", llm="t5")
    with pytest.raises(ValueError, match=r"encoder-decoder \(t5\). Call the model itself"):
        model.base_model(**tiny_sample_inputs(processor))


# --- TRL's SFTTrainer ------------------------------------------------------------------------------------------


def import_trl():
    # `make setup` installs the `trl` extra; the lowest-pins venv has none (trl 1.16 needs accelerate >= 1.10).
    return pytest.importorskip("trl", minversion="1.16", reason="needs the `trl` extra (trl >= 1.16)")


def sft_config(output_dir, **overrides):
    defaults = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        save_steps=2,
        logging_steps=1,
        use_cpu=True,
        bf16=False,  # SFTConfig's default is bf16 autocast; float32 here, to compare losses closely
        report_to=[],
        seed=0,
        data_seed=0,
        # Our collator builds the batches from the raw rows (prompt, target, image or TRL's messages / images).
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,  # the raw columns are the collator's input (our Trainers keep them anyway)
    )
    return import_trl().SFTConfig(**{**defaults, **overrides})


def sft_on(our_trainer):
    """TRL's SFTTrainer mixed with one of ours, as the README shows:
    `class LavinSFTTrainer(LavinTrainer, SFTTrainer)`."""
    return type("SFTOnOurTrainer", (our_trainer, import_trl().SFTTrainer), {})


@pytest.mark.parametrize("kind", ["lavin", "crome"])
def test_sft_trainer_scores_our_models_as_their_own_loss_does(backbones, kind, tmp_path):
    trl = import_trl()
    model, processor = build(backbones, kind)
    collator = VisionLanguageCollator(processor)
    dataset = toy_dataset(tmp_path, n=8)
    trainer = trl.SFTTrainer(
        model=model,
        args=sft_config(tmp_path / "run"),
        train_dataset=dataset,
        processing_class=processor,
        data_collator=collator,
    )
    batch = collator([dataset[i] for i in range(4)])
    with torch.no_grad():
        own = model(**batch)  # the forward TRL wraps, without its fused head
        fused = model(**batch, fused_lm_head=True)  # what SFTTrainer.compute_loss calls
    torch.testing.assert_close(fused.loss, own.loss, rtol=1e-5, atol=1e-5)

    before = {name: tensor.clone() for name, tensor in model.adapter_state_dict().items()}
    trainer.train()
    after = model.adapter_state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before)
    # its checkpoints are adapter-only, and load back as the trained model
    model.eval()
    reloaded = type(model).from_pretrained(tmp_path / "run" / "checkpoint-4").eval()
    inputs = tiny_sample_inputs(processor)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["lavin", "crome"])
def test_our_trainer_mixed_with_sft_trainer_resumes_exactly(backbones, kind, tmp_path):
    trainer_class = sft_on(LavinTrainer if kind == "lavin" else CromeTrainer)
    dataset = toy_dataset(tmp_path, n=12)

    def run(resume=None):
        model, processor = build(backbones, kind)
        model.train()
        trainer = trainer_class(
            model=model,
            args=sft_config(tmp_path / "run"),
            train_dataset=dataset,
            processing_class=processor,
            data_collator=VisionLanguageCollator(processor),
        )
        trainer.train(resume_from_checkpoint=resume)
        return model.adapter_state_dict()

    uninterrupted = run()
    resumed = run(resume=str(tmp_path / "run" / "checkpoint-2"))
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)


def test_our_trainer_mixed_with_sft_trainer_trains_a_lora_with_our_adapters(backbones, tmp_path):
    model, processor = build(backbones, "lavin")
    trainer_class = sft_on(LavinTrainer)
    lora = LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    arguments = dict(
        args=sft_config(tmp_path / "run", max_steps=2),
        train_dataset=toy_dataset(tmp_path, n=8),
        processing_class=processor,
        data_collator=VisionLanguageCollator(processor),
    )
    with pytest.raises(ValueError, match=r"Pass model=get_peft_model\(model, peft_config\) instead"):
        trainer_class(model=model, peft_config=lora, **arguments)

    before = {name: tensor.clone() for name, tensor in model.adapter_state_dict().items()}
    trainer_class(model=get_peft_model(model, lora), **arguments).train()
    saved = load_file(str(tmp_path / "run" / "checkpoint-2" / ADAPTER_WEIGHTS_NAME))
    assert any(not torch.equal(before[name], saved[name]) for name in before if "projector" in name)
    assert any(name.endswith("lora_B.default.weight") and saved[name].abs().sum() > 0 for name in saved)


@pytest.mark.parametrize("kind", ["lavin", "crome"])
def test_plain_sft_trainer_with_trls_vision_collator_ignores_the_image_placeholders_as_the_model_does(
    backbones, kind, tmp_path
):
    # TRL's vision collator (what plain SFTTrainer builds for image rows) labels every token, the image placeholders
    # included; TRL's fused head (model.forward replaced by SFTTrainer) scored them as a vocabulary entry. The model
    # ignores them in labels it is given, under any forward put on it: the fused loss equals the model's own.
    trl = import_trl()
    model, processor = build(backbones, kind)
    rows = conversation_rows(4)
    trainer = trl.SFTTrainer(
        model=model,
        args=sft_config(tmp_path / "run", dataset_kwargs=None, remove_unused_columns=True),
        train_dataset=rows,
        processing_class=processor,
    )
    assert type(trainer.data_collator).__name__ == "DataCollatorForVisionLanguageModeling"
    batch = trainer.data_collator([rows[i] for i in range(2)])
    placeholders = batch["input_ids"] == model.config.image_token_id
    assert (batch["labels"][placeholders] == model.config.image_token_id).all()  # TRL labels them
    with torch.no_grad():
        fused = model(**batch, fused_lm_head=True).loss
        own = model(**batch).loss
    torch.testing.assert_close(fused, own, rtol=1e-5, atol=1e-5)


def test_trls_vision_collator_trains_our_trainer_mixed_with_sft_and_its_checkpoints_reload(
    backbones, tmp_path
):
    model, processor = build(backbones, "lavin")
    trainer = sft_on(LavinTrainer)(
        model=model,
        args=sft_config(tmp_path / "run", dataset_kwargs=None, remove_unused_columns=True, max_steps=2),
        train_dataset=conversation_rows(8),
        processing_class=processor,
    )
    assert type(trainer.data_collator).__name__ == "DataCollatorForVisionLanguageModeling"
    before = {name: tensor.clone() for name, tensor in model.adapter_state_dict().items()}
    trainer.train()
    after = model.adapter_state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before)
    reloaded = type(model).from_pretrained(tmp_path / "run" / "checkpoint-2").eval()
    inputs = tiny_sample_inputs(processor)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model.eval()(**inputs).logits, rtol=0, atol=0)


def conversation_rows(n: int):
    """`n` conversations in TRL's language-modeling form (`messages` with the answer as the last turn, `images`)."""
    rows = image_question_rows(n, completion=[answer("red")] * n).rename_column("prompt", "messages")
    return rows.map(
        lambda row: {"messages": row["messages"] + row["completion"]}, remove_columns=["completion"]
    )


# TRL's conversational rows: a question about one image, and answers as assistant turns.
QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color?"}]}]


def answer(text: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def image_question_rows(n: int, **columns):
    """`n` rows of a red image and QUESTION (`images`, `prompt`), plus `columns`."""
    import datasets
    from PIL import Image

    images = [[Image.new("RGB", (32, 32), "red")]] * n
    return datasets.Dataset.from_dict({"images": images, "prompt": [QUESTION] * n, **columns})


def preference_rows(n: int = 4):
    """DPO's preference rows: a chosen and a rejected answer."""
    return image_question_rows(n, chosen=[answer("red")] * n, rejected=[answer("blue")] * n)


def rl_config(config_class, output_dir, **overrides):
    """A TRL DPOConfig / GRPOConfig for a short CPU run, in float32."""
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        use_cpu=True,
        report_to=[],
        seed=0,
        bf16=False,  # TRL's default autocasts the forward to bfloat16
        **overrides,
    )
    return config_class(**settings)


def prompt_rows(n: int = 4):
    """`n` prompts of QUESTION about a red image, in the single-image `image` column (TRL's GRPO / RLOO examples)."""
    import datasets
    from PIL import Image

    return datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (32, 32), "red")] * n, "prompt": [QUESTION] * n}
    )


def comparable_logs(trainer) -> list[dict]:
    """The Trainer's logs without the timings, which differ from run to run."""
    timings = ("runtime", "per_second", "time")
    return [
        {key: value for key, value in entry.items() if not any(word in key for word in timings)}
        for entry in trainer.state.log_history
    ]


def generating_trainer(trl_class, config_class, model, processor, output_dir, **overrides):
    """TRL's GRPOTrainer or RLOOTrainer for one step (unless `overrides` say otherwise) on image questions: two
    completions of 4 tokens per prompt, rewarded by their length."""
    settings = dict(num_generations=2, max_completion_length=4, max_steps=1, save_strategy="no")
    config = rl_config(config_class, output_dir, **{**settings, **overrides})
    return trl_class(
        model=model,
        reward_funcs=lambda completions, **kwargs: [float(len(str(c))) for c in completions],
        args=config,
        train_dataset=prompt_rows(),
        processing_class=processor,
    )


@pytest.mark.parametrize("kind", ["lavin", "crome"])
def test_dpo_trainer_reloads_its_reference_model_from_our_checkpoint(backbones, kind, tmp_path):
    """TRL's DPOTrainer, given a model without `ref_model`, loads the reference again from the model's checkpoint
    by the class `config.json` names (`architectures`, which transformers' saves write): our adapter-only saves
    did not write it, and the DPOTrainer stopped with "'NoneType' object is not subscriptable"."""
    trl = import_trl()
    model, processor = build(backbones, kind)
    model.save_pretrained(tmp_path / "ckpt", processor=processor)
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["architectures"] == [type(model).__name__]

    model = type(model).from_pretrained(tmp_path / "ckpt")
    trainer = trl.DPOTrainer(
        model=model,
        args=rl_config(trl.DPOConfig, tmp_path / "dpo", max_steps=1, save_strategy="no"),
        train_dataset=preference_rows(),
        processing_class=processor,
    )
    assert type(trainer.ref_model) is type(model)
    reference = trainer.ref_model
    with torch.no_grad():  # the reference is the checkpoint's model
        inputs = tiny_sample_inputs(processor)
        torch.testing.assert_close(reference(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)

    # DPO scores an answer by its log-probability under TRL's fused LM head (on `base_model`): it equals the one
    # the model's own logits give, answer tokens and EOS only.
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        fused = model(**inputs, labels=labels, fused_lm_head=True, use_cache=False).log_probs
        trl_scores = fused[:, -(labels.shape[1] - 1) :].sum(1)
        log_probs = model(**inputs, use_cache=False).logits[:, :-1].log_softmax(-1)
        targets = labels[:, 1:]
        picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        own_scores = (picked * (targets != -100)).sum(1)
    torch.testing.assert_close(trl_scores, own_scores, rtol=1e-5, atol=1e-5)
    trainer.train()


def test_dpo_mixed_with_our_trainer_resumes_exactly(backbones, tmp_path):
    """`class LavinDPOTrainer(LavinTrainer, DPOTrainer)`: adapter-only checkpoints that resume to the weights of an
    uninterrupted run, as the SFTTrainer mix does."""
    trl = import_trl()

    class LavinDPOTrainer(LavinTrainer, trl.DPOTrainer):
        pass

    model, processor = build(backbones, "lavin")
    model.save_pretrained(tmp_path / "ckpt", processor=processor)

    def run(output, **train_kwargs):
        trainer = LavinDPOTrainer(
            model=LavinForConditionalGeneration.from_pretrained(tmp_path / "ckpt"),
            args=rl_config(trl.DPOConfig, tmp_path / output, max_steps=4, save_steps=2, learning_rate=5e-3),
            train_dataset=preference_rows(8),
            processing_class=processor,
        )
        trainer.train(**train_kwargs)
        return load_file(tmp_path / output / "checkpoint-4" / ADAPTER_WEIGHTS_NAME)

    uninterrupted = run("full")
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = run("resumed", resume_from_checkpoint=True)
    before = LavinForConditionalGeneration.from_pretrained(tmp_path / "ckpt").adapter_state_dict()
    assert any(not torch.equal(before[name], uninterrupted[name]) for name in before)  # DPO trained them
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["lavin", "crome"])
def test_grpo_trainer_trains_lavin_and_stops_crome_with_our_message(backbones, kind, tmp_path):
    """TRL's GRPOTrainer generates with the model (images included) and scores the completions with the fused LM
    head, as DPO does. It passes a fixed set of image inputs to the forward, without CROME's Q-Former instruction
    (as for transformers' InstructBLIP): CROME stops at the first step with our message, not inside the Q-Former."""
    trl = import_trl()
    model, processor = build(backbones, kind)
    trainer = generating_trainer(trl.GRPOTrainer, trl.GRPOConfig, model, processor, tmp_path / "grpo")
    if kind == "crome":
        with pytest.raises(
            ValueError, match="pass qformer_input_ids.*GRPOTrainer and RLOOTrainer leave them out"
        ):
            trainer.train()
        return
    trainer.train()
    assert trainer.state.global_step == 1


def test_our_trainers_take_the_collators_processor_when_given_no_processing_class(backbones, tmp_path):
    """Given our collator and no `processing_class`, our Trainers (and their TRL mixes) take the collator's
    processor: every checkpoint holds it with its settings, and TRL's SFTTrainer no longer looks for one in the
    checkpoint of a model never saved (it stopped: "pass processing_class=processor")."""
    trl = import_trl()

    class LavinSFTTrainer(LavinTrainer, trl.SFTTrainer):
        pass

    for trainer_class in (LavinTrainer, LavinSFTTrainer):
        model, _ = build(backbones, "lavin")
        processor = LavinProcessor.from_backbones(backbones["llama"], backbones["vision"], max_length=48)
        output = tmp_path / trainer_class.__name__
        trainer = trainer_class(
            model=model,
            args=sft_config(output, max_steps=1, save_steps=1),
            train_dataset=toy_dataset(tmp_path, n=4),
            data_collator=VisionLanguageCollator(processor),
        )
        assert trainer.processing_class is processor
        trainer.train()
        assert LavinProcessor.from_pretrained(output / "checkpoint-1").max_length == 48


@pytest.mark.parametrize("method", ["GRPO", "RLOO"])
def test_online_trainers_mixed_with_crome_trainer_are_refused_before_anything_runs(
    backbones, method, tmp_path
):
    """TRL's GRPO and RLOO hand the model a fixed set of image inputs, without CROME's Q-Former instruction: GRPO
    stopped at the first step, after generating, and RLOO with TRL's own TypeError ('prompt_mask'). Mixed with
    CromeTrainer they are refused when the Trainer is created, saying what trains CROME."""
    trl = import_trl()
    trl_class, config_class = getattr(trl, f"{method}Trainer"), getattr(trl, f"{method}Config")

    class Mixed(CromeTrainer, trl_class):
        pass

    model, processor = build(backbones, "crome")
    with pytest.raises(ValueError, match=f"TRL's {method}Trainer hands the model a fixed set") as caught:
        generating_trainer(Mixed, config_class, model, processor, tmp_path / "run")
    assert "qformer_input_ids" in str(caught.value) and "LavinTrainer" in str(caught.value)
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize(
    "case",
    ["RLOOTrainer with sync_ref_model", "DPOTrainer with sync_ref_model", "SFTTrainer without processor"],
)
def test_trl_lookups_in_the_checkpoint_of_a_model_never_saved_are_asked_for_by_name(
    backbones, case, tmp_path
):
    """TRL's trainers load what they are not given from the checkpoint the model was loaded from
    (`config._name_or_path`): the processor without `processing_class`; the reference model of DPO / KTO / RLOO /
    GRPO with beta > 0 where our Trainers do not give it (`sync_ref_model`, sharded training). A model built
    with `from_backbones` has none: TRL stopped with "Repo id must use alphanumeric chars ... ''". Mixed with ours,
    the error says what to pass, before training."""
    trl = import_trl()
    trl_class = {"R": trl.RLOOTrainer, "D": trl.DPOTrainer, "S": trl.SFTTrainer}[case[0]]

    class Mixed(LavinTrainer, trl_class):
        pass

    model, processor = build(backbones, "lavin")
    with pytest.raises(ValueError, match="built with from_backbones and never saved") as caught:
        if case.startswith("RLOO"):
            generating_trainer(Mixed, trl.RLOOConfig, model, processor, tmp_path / "run", sync_ref_model=True)
        elif case.startswith("DPO"):
            Mixed(
                model=model,
                args=rl_config(trl.DPOConfig, tmp_path / "run", max_steps=1, sync_ref_model=True),
                train_dataset=preference_rows(),
                processing_class=processor,
            )
        else:  # no processor at all (with our collator, the Trainer takes the collator's: see below)
            Mixed(model=model, args=sft_config(tmp_path / "run"), train_dataset=toy_dataset(tmp_path, n=4))
    message = str(caught.value)
    assert trl_class.__name__ in message and "from_pretrained(folder)" in message
    expected = {
        "R": "its reference model (or set beta=0.0 for none)",
        "D": "its reference model (pass ref_model=copy.deepcopy(model))",
        "S": "its processor (pass processing_class=processor)",
    }
    assert expected[case[0]] in message
    assert not os.path.exists(tmp_path / "run" / "checkpoint-1")


@pytest.mark.parametrize("case", ["DPO lavin", "DPO crome", "KTO lavin"])
def test_preference_trainers_mixed_with_ours_take_the_model_with_its_starting_weights_as_reference(
    backbones, case, tmp_path
):
    """Mixed with ours, TRL's DPO / KTO given no ref_model use the model being trained, run with the trainable
    weights it had when the Trainer was created, as the reference (reference.py): no second copy of the backbones
    (TRL loaded one from the checkpoint, or stopped for a model built with from_backbones). Training equals training
    against a separate copy of the starting model, step for step."""
    trl = import_trl()
    method, kind = case.split()
    trl_class, config_class = getattr(trl, f"{method}Trainer"), getattr(trl, f"{method}Config")
    rows = preference_rows(8) if method == "DPO" else unpaired_preference_rows(8)

    class Mixed(CromeTrainer if kind == "crome" else LavinTrainer, trl_class):
        pass

    def run(output, separate_reference):
        model, processor = build(backbones, kind)
        start = copy.deepcopy(model)
        trainer = Mixed(
            model=model,
            args=rl_config(
                config_class, tmp_path / output, max_steps=3, save_strategy="no", learning_rate=1e-2
            ),
            train_dataset=rows,
            processing_class=processor,
            **({"ref_model": copy.deepcopy(model)} if separate_reference else {}),
        )
        trainer.train()
        trained = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        return trainer, model, start, processor, trained, comparable_logs(trainer)

    trainer, model, start, processor, trained, logs = run("shared", separate_reference=False)
    assert sum(p.numel() for p in trainer.ref_model.parameters()) == 0  # no copy of the backbones
    model.train()
    with torch.no_grad():  # the reference is the starting model; the model keeps its trained weights and mode
        inputs = tiny_sample_inputs(processor)
        torch.testing.assert_close(trainer.ref_model(**inputs).logits, start(**inputs).logits, rtol=0, atol=0)
    assert model.training
    assert all(torch.equal(p, trained[name]) for name, p in model.named_parameters() if name in trained)
    assert any(not torch.equal(p, dict(start.named_parameters())[name]) for name, p in trained.items())
    _, _, _, _, trained_against_copy, logs_against_copy = run("separate", separate_reference=True)
    assert logs == logs_against_copy
    for name, value in trained_against_copy.items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("method", ["RLOO", "GRPO"])
def test_online_trainers_mixed_with_ours_take_the_model_with_its_starting_weights_as_reference(
    backbones, method, tmp_path, monkeypatch
):
    """RLOO and GRPO take no ref_model: with beta > 0 TRL loads the reference again from the model's checkpoint
    (a second copy of the backbones), or stops for a model built with from_backbones. Mixed with ours, the reference
    is the model with its starting trainable weights (reference.py); training equals training against TRL's own
    reference loaded from the checkpoint, step for step, once the KL term is in play."""
    trl = import_trl()
    trl_class, config_class = getattr(trl, f"{method}Trainer"), getattr(trl, f"{method}Config")

    class Mixed(LavinTrainer, trl_class):
        pass

    model, processor = build(backbones, "lavin")  # never saved: TRL alone would stop
    start = copy.deepcopy(model)
    settings = dict(beta=0.5, max_steps=3, learning_rate=1e-2, logging_steps=1)
    trainer = generating_trainer(Mixed, config_class, model, processor, tmp_path / "new", **settings)
    assert sum(p.numel() for p in trainer.ref_model.parameters()) == 0  # no copy of the backbones
    trainer.train()
    with torch.no_grad():
        inputs = tiny_sample_inputs(processor)
        torch.testing.assert_close(trainer.ref_model(**inputs).logits, start(**inputs).logits, rtol=0, atol=0)
    assert model.training

    def run(output):
        """Train the starting model, loaded from a checkpoint; return the trained weights and the logs."""
        start.save_pretrained(tmp_path / "ckpt", processor=processor)
        loaded = LavinForConditionalGeneration.from_pretrained(tmp_path / "ckpt")
        trainer = generating_trainer(Mixed, config_class, loaded, processor, tmp_path / output, **settings)
        trainer.train()
        trained = {name: p.detach().clone() for name, p in loaded.named_parameters() if p.requires_grad}
        return trainer, trained, comparable_logs(trainer)

    shared, trained, logs = run("shared")
    assert sum(p.numel() for p in shared.ref_model.parameters()) == 0
    with monkeypatch.context() as patched:  # TRL's own reference: loaded from the checkpoint
        patched.setattr("mmadapters.trainers.trainer.shares_the_policy_safely", lambda training_args: False)
        loaded, trained_against_loaded, logs_against_loaded = run("loaded")
    assert type(loaded.ref_model) is LavinForConditionalGeneration
    assert logs[-2]["kl"] != 0  # the reference counted in the last step
    assert logs == logs_against_loaded
    for name, value in trained_against_loaded.items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=0, msg=name)


def test_the_shared_reference_of_a_lora_on_top_is_the_starting_lora_and_adapters(backbones, tmp_path):
    """GRPO (beta > 0) mixed with ours, on `get_peft_model(model, LoraConfig(...))`: the reference is the model with
    the LoRA and our adapters as they were when the Trainer was created (TRL alone keeps a copy of the starting LoRA
    for its reference but would run our adapters as they are trained), while both go on training."""
    trl = import_trl()

    class Mixed(LavinTrainer, trl.GRPOTrainer):
        pass

    model, processor = build(backbones, "lavin")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    start = copy.deepcopy(peft_model)
    settings = dict(beta=0.5, max_steps=2, learning_rate=1e-2)
    trainer = generating_trainer(Mixed, trl.GRPOConfig, peft_model, processor, tmp_path / "run", **settings)
    assert sum(p.numel() for p in trainer.ref_model.parameters()) == 0
    trainer.train()
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    initial = dict(start.get_base_model().named_parameters())
    assert any("lora_" in name and not torch.equal(p, initial[name]) for name, p in trained.items())
    assert any("llm_adapters" in name and not torch.equal(p, initial[name]) for name, p in trained.items())
    with torch.no_grad():
        inputs = tiny_sample_inputs(processor)
        torch.testing.assert_close(trainer.ref_model(**inputs).logits, start(**inputs).logits, rtol=0, atol=0)


def test_trl_trainer_arguments_given_by_position_are_read_in_that_trainers_order(backbones, tmp_path):
    """TRL's trainers take other arguments second (`GRPOTrainer(model, reward_funcs, args)`, `DPOTrainer(model,
    ref_model, args)`) than transformers' Trainer (`args`): mixed with ours, the reward function was taken for the
    training arguments (AttributeError 'ddp_find_unused_parameters'), and a ref_model of None given by position
    left the reference to TRL. Both are now read by the mixed-in trainer's own order."""
    trl = import_trl()

    class GRPOMix(LavinTrainer, trl.GRPOTrainer):
        pass

    class DPOMix(LavinTrainer, trl.DPOTrainer):
        pass

    model, processor = build(backbones, "lavin")
    config = rl_config(
        trl.GRPOConfig, tmp_path / "grpo", num_generations=2, max_completion_length=4, max_steps=1, beta=0.1
    )
    grpo = GRPOMix(
        model, lambda completions, **kwargs: [1.0] * len(completions), config, prompt_rows(), None, processor
    )
    assert sum(p.numel() for p in grpo.ref_model.parameters()) == 0  # the shared reference
    assert grpo.args.ddp_find_unused_parameters is True and config.ddp_find_unused_parameters is None
    grpo.train()
    assert grpo.state.global_step == 1
    dpo_config = rl_config(trl.DPOConfig, tmp_path / "dpo", max_steps=1)
    dpo = DPOMix(model, None, dpo_config, train_dataset=preference_rows(), processing_class=processor)
    assert sum(p.numel() for p in dpo.ref_model.parameters()) == 0
    assert dpo.args.ddp_find_unused_parameters is True


def unpaired_preference_rows(n: int = 4):
    """KTO's rows: an answer labelled desirable or not."""
    return image_question_rows(n, completion=[answer("red")] * n, label=[True, False] * (n // 2))


@pytest.mark.parametrize("kind", ["lavin", "crome"])
def test_kto_trainer_trains_our_models(backbones, kind, tmp_path):
    """TRL's KTOTrainer (unpaired preferences) scores completions as DPO does; with ref_model given, a step trains."""
    trl = import_trl()
    model, processor = build(backbones, kind)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    trainer = trl.KTOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=rl_config(trl.KTOConfig, tmp_path / "kto", max_steps=1, save_strategy="no", learning_rate=1e-2),
        train_dataset=unpaired_preference_rows(),
        processing_class=processor,
    )
    trainer.train()
    assert trainer.state.global_step == 1
    assert any(not torch.equal(p, before[name]) for name, p in model.named_parameters() if name in before)


def test_rloo_trainer_builds_its_reference_from_our_checkpoint(backbones, tmp_path):
    """TRL's RLOOTrainer generates with the images and, with beta > 0, loads its reference model again from the
    checkpoint the model was loaded from: our class, with the checkpoint's weights."""
    trl = import_trl()
    model, processor = build(backbones, "lavin")
    model.save_pretrained(tmp_path / "ckpt", processor=processor)
    model = LavinForConditionalGeneration.from_pretrained(tmp_path / "ckpt")
    trainer = generating_trainer(trl.RLOOTrainer, trl.RLOOConfig, model, processor, tmp_path / "rloo")
    assert type(trainer.ref_model) is LavinForConditionalGeneration
    with torch.no_grad():
        inputs = tiny_sample_inputs(processor)
        torch.testing.assert_close(trainer.ref_model(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    trainer.train()
    assert trainer.state.global_step == 1
