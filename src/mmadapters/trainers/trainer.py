"""`transformers.Trainer` subclasses for our adapter models.

What they add to the Trainer: adapter-only checkpoints (and `resume_from_checkpoint` from them), a checkpoint of
the steps done when an error or Ctrl-C stops training (`_save_progress_after`), a report of
what trains at the start, LaVIN's weight-decay groups (none on biases and 1-D parameters),
LaVIN's routing weights in the logs (per modality), CROME's stages, and training steps that compute logits only
where a token is supervised.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import Trainer
from transformers.trainer_utils import HubStrategy

from ..checkpoint_files import ADAPTER_WEIGHTS_NAME, adapter_weights_file
from ..hub.push import PushError, create_repo
from ..hub.trainer_push import LAST_CHECKPOINT_IN_REPO, check_trainer_can_push, push_trainer_folder
from ..modeling.causal_lm_output import next_token_labels, supervised_positions
from ..modeling.crome import CromeForConditionalGeneration
from ..modeling.lavin import LavinForConditionalGeneration
from ..modeling.peft_on_top import adopt_peft_model
from .checkpoints import (
    CHECKPOINT_PREFIX,
    StepBoundary,
    check_sharded_saving,
    checkpoint_is_complete,
    find_last_checkpoint,
)
from .collator import VisionLanguageCollator
from .reference import (
    InitialWeightsReference,
    reference_instead_of_loading,
    shares_the_policy_safely,
    trl_class_loading_its_reference,
    trl_class_taking_a_reference,
)

logger = logging.getLogger(__name__)
TRAINING_ARGS_NAME = "training_args.bin"


def trainable_report(model: torch.nn.Module) -> dict[str, int]:
    """Trainable parameters per top-level module (only those that train), plus the total."""
    report: dict[str, int] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            top = name.split(".", 1)[0]
            report[top] = report.get(top, 0) + parameter.numel()
    report["total"] = sum(report.values())
    return report


def load_adapter_checkpoint(
    folder: str, model: torch.nn.Module, wrapped: torch.nn.Module | None = None
) -> None:
    """Load the adapter tensors of checkpoint `folder` into `model` (LaVIN or CROME), which `wrapped` may wrap
    (DDP, FSDP). Under FSDP each process holds a shard of every parameter: the tensors are loaded into the gathered
    parameters, and FSDP writes them back to each shard."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    path = adapter_weights_file(folder)
    if path is None:
        raise FileNotFoundError(
            f"{folder} holds no {ADAPTER_WEIGHTS_NAME}: not a checkpoint of this trainer."
        )
    saved = load_file(path)
    if isinstance(wrapped, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(wrapped, writeback=True):
            model.load_adapter_state_dict(saved, source=folder)
    elif isinstance(wrapped, FSDPModule) or isinstance(model, FSDPModule):
        raise NotImplementedError(
            "Resuming under FSDP2 (fully_shard) is not supported: use fsdp_version: 1 (recipes/accelerate/"
            "fsdp-gpus.yaml), or load the checkpoint with from_pretrained and start a new run from it."
        )
    else:
        model.load_adapter_state_dict(saved, source=folder)


def logit_targets(model: torch.nn.Module, labels: torch.Tensor, supervised_logits_only: bool) -> torch.Tensor:
    """The token each of the model's output logits should predict, -100 where none: a decoder-only LLM's logit at
    position t predicts labels[t + 1] (with `supervised_logits_only`, the logits are those of the supervised
    positions only); an encoder-decoder LLM's decoder logits predict `labels` as they are."""
    if getattr(model, "is_encoder_decoder_llm", False):
        return labels
    targets = next_token_labels(labels)
    return targets[:, supervised_positions(labels)] if supervised_logits_only else targets


def _positional_as_keywords(trainer_class: type, args: tuple, kwargs: dict) -> dict:
    """The Trainer's arguments, all by name: positional ones named by the `__init__` they go to, transformers'
    Trainer's or, in a mix, the TRL trainer's, whose orders differ (`GRPOTrainer(model, reward_funcs, args)`,
    `DPOTrainer(model, ref_model, args)`), so that what is looked up below is found wherever it was given."""
    after_ours = trainer_class.__mro__[trainer_class.__mro__.index(AdapterTrainer) + 1 :]
    init = next(kind.__dict__["__init__"] for kind in after_ours if "__init__" in kind.__dict__)
    parameters = list(inspect.signature(init).parameters.values())[1:]  # without self
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(args) > len(parameters) or any(p.kind not in positional for p in parameters[: len(args)]):
        raise TypeError(
            f"{trainer_class.__name__}() takes at most {len(parameters)} positional arguments "
            f"({', '.join(p.name for p in parameters if p.kind in positional)}), got {len(args)}."
        )
    named = {parameter.name: value for parameter, value in zip(parameters, args, strict=False)}
    given_twice = sorted(set(named) & set(kwargs))
    if given_twice:
        raise TypeError(f"{trainer_class.__name__}() got multiple values for argument(s) {given_twice}.")
    return {**named, **kwargs}


def _finding_unused_parameters(kwargs: dict) -> dict:
    """The Trainer's arguments with DDP's unused-parameter detection on, unless the user set
    `ddp_find_unused_parameters` (in a copy: the caller's TrainingArguments are not changed).

    A batch without images leaves the vision side unused (LaVIN's vision adapters and projector, CROME's image
    path), and DDP then stops at the next step ("Expected to have finished reduction in the prior iteration").
    transformers turns the detection off under activation checkpointing, which breaks *reentrant* checkpointing;
    ours is non-reentrant (transformers' default; LaVIN refuses the other), so it stays on, unless reentrant
    checkpointing is asked for."""
    training_args = kwargs.get("args")
    if training_args is None or training_args.ddp_find_unused_parameters is not None:
        return kwargs
    checkpointing = (
        getattr(training_args, "activation_checkpointing_kwargs", None)
        or getattr(training_args, "gradient_checkpointing_kwargs", None)
        or {}
    )
    if checkpointing.get("use_reentrant"):
        return kwargs
    # A shallow copy: TrainingArguments.__post_init__ must not run again (dataclasses.replace would).
    copied = copy.copy(training_args)
    copied.ddp_find_unused_parameters = True
    return {**kwargs, "args": copied}


def refuse_data_parallel(n_gpu: int, model: Any) -> None:
    """Refuse what transformers' Trainer does when one process sees several GPUs: copy the model onto each with
    `nn.DataParallel` (it skips bitsandbytes-quantised models, as here).

    DataParallel cuts every tensor of a batch into equal chunks along its first dimension. A batch's images
    (`pixel_values`, CROME's Q-Former instructions) are counted per image, not per sample, so with text-only or
    multi-image samples a GPU would get images of another GPU's samples; and it gathers outputs whose fields
    must match on every GPU (the logits of the supervised positions, the image outputs of a chunk without
    images do not). One process per GPU (DDP) has none of this."""
    quantised = getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    if n_gpu > 1 and not quantised:
        raise ValueError(
            f"This process sees {n_gpu} GPUs, and transformers' Trainer would copy the model onto each with "
            "nn.DataParallel, which splits a batch's images apart from their samples (text-only or multi-image "
            f"samples). Start one process per GPU instead: `torchrun --nproc_per_node {n_gpu} your_script.py` or "
            "`accelerate launch` (DDP; README, 'Multi-process training'), or train on one GPU "
            "(CUDA_VISIBLE_DEVICES=0)."
        )


def unsaved_model_error(
    trainer_class: type, model: Any, training_args: Any, processor_given: bool
) -> Exception | None:
    """The error to raise instead of TRL's OSError when a TRL trainer looked for what it was not given in the
    checkpoint the model was loaded from (`config._name_or_path`), and the model was built with `from_backbones` and
    never saved, so there is none: TRL stopped with "Repo id must use alphanumeric chars ... ''". TRL's trainers
    load the processor from there when given no `processing_class`, and the reference model of DPO / KTO, and of
    RLOO / GRPO with `beta` > 0, where the mix leaves it to TRL (see `shares_the_policy_safely`)."""
    trl_classes = [kind for kind in trainer_class.__mro__ if kind.__module__.startswith("trl.")]
    config = getattr(model, "config", None)
    if not trl_classes or config is None or getattr(config, "_name_or_path", None):
        return None
    name, model_name = trl_classes[0].__name__, type(model).__name__
    takes_reference = trl_class_taking_a_reference(trainer_class) is not None
    if not processor_given:
        needs = "its processor (pass processing_class=processor)"
    elif takes_reference or getattr(training_args, "beta", 0.0):
        remedy = "pass ref_model=copy.deepcopy(model)" if takes_reference else "or set beta=0.0 for none"
        needs = f"its reference model ({remedy})"
    else:
        return None  # not one of the lookups above: TRL's own error stands
    return ValueError(
        f"TRL's {name} loads {needs} from the checkpoint the model was loaded from, and this {model_name} was built "
        f"with from_backbones and never saved. Pass it as said, or save the model and load it with "
        f"{model_name}.from_pretrained(folder) before creating the Trainer (then that checkpoint is used)."
    )


class AdapterTrainer(Trainer):
    """Trainer for models with frozen backbones and an adapter side that saves on its own.

    A `peft.PeftModel` around LaVIN or CROME (`get_peft_model(model, LoraConfig(...))`) is accepted: the Trainer
    trains the model inside it, LoRA and our adapters together, and every checkpoint holds both (one folder that
    `from_pretrained` loads back).

    Given our collator and no `processing_class`, the collator's processor is taken as the processing class (saved
    in every checkpoint). Positional arguments are read in the order of the `__init__` they go to (a TRL trainer's,
    in a mix).

    Mixed with TRL's DPOTrainer or KTOTrainer and given no `ref_model`, or with RLOOTrainer or GRPOTrainer and `beta`
    > 0, the reference is the model itself with its starting trainable weights (`InitialWeightsReference`), not a
    second copy of the backbones loaded from the checkpoint.

    `TrainingArguments(push_to_hub=True)` and `push_to_hub()` push adapter-only checkpoints with our model card
    (see `mmadapters.hub.trainer_push`); `hub_license`: the card's license when the backbones' cards do not settle
    it."""

    # How the error note of an interrupted run (`_save_progress_after`) says to continue; a program that runs this
    # Trainer for its users (the quickstart) names its own command.
    resume_hint = "trainer.train(resume_from_checkpoint=True) (mmadapters train RECIPE --resume)"

    def __init__(self, *args: Any, hub_license: str | None = None, **kwargs: Any) -> None:
        kwargs = _positional_as_keywords(type(self), args, kwargs)
        if kwargs.get("peft_config") is not None:  # TRL's trainers take one
            raise ValueError(
                "peft_config=: TRL's trainers wrap the model with PEFT inside their __init__, after this Trainer has "
                "taken it, so LaVIN's / CROME's own modules would stay frozen and be left out of the checkpoints. "
                "Pass model=get_peft_model(model, peft_config) instead: the LoRA and our modules then train and save "
                "together."
            )
        # A PeftModel around one of ours: the model itself (its PEFT layers recorded, our modules training again)
        model = kwargs["model"] = adopt_peft_model(kwargs.get("model"))
        collator = kwargs.get("data_collator")
        if kwargs.get("processing_class") is None and isinstance(collator, VisionLanguageCollator):
            # The collator's processor: saved in every checkpoint with its settings, and what TRL's trainers read
            # (given none, they load one from the model's checkpoint, which a model never saved does not have).
            kwargs["processing_class"] = collator.processor
        kwargs = _finding_unused_parameters(kwargs)
        # TRL's trainers given no reference: the model itself with its starting trainable weights (reference.py)
        sharing_reference = contextlib.nullcontext()
        if model is not None:
            self._take_model(model)
            training_args = kwargs.get("args")
            if shares_the_policy_safely(training_args):
                takes_reference = trl_class_taking_a_reference(type(self)) is not None  # DPO, KTO
                if takes_reference and kwargs.get("ref_model") is None:
                    kwargs["ref_model"] = InitialWeightsReference(model)
                loads_reference = trl_class_loading_its_reference(type(self), training_args)  # RLOO, GRPO
                if loads_reference is not None:
                    sharing_reference = reference_instead_of_loading(loads_reference, model)
        self.hub_license = hub_license  # read by init_hf_repo, which transformers' __init__ calls
        # id(data set) -> (data set, data set with a length column): counted once, not at every evaluation
        self._counted_datasets: dict[int, tuple[Any, Any]] = {}
        try:
            with sharing_reference:
                super().__init__(**kwargs)
        except OSError as error:
            processor_given = kwargs.get("processing_class") is not None
            clearer = unsaved_model_error(type(self), model, kwargs.get("args"), processor_given)
            if clearer is not None:
                raise clearer from error
            raise
        refuse_data_parallel(self.args.n_gpu, self.model)
        trained = self._unwrapped()
        if hasattr(trained, "check_save_directory"):  # the final save_model writes output_dir itself
            trained.check_save_directory(self.args.output_dir)
        if hasattr(trained, "check_processor"):
            if self.processing_class is not None:  # saved in every checkpoint
                trained.check_processor(self.processing_class)
            if isinstance(self.data_collator, VisionLanguageCollator):  # builds every batch
                trained.check_processor(self.data_collator.processor)
        state = self.accelerator.state
        check_sharded_saving(
            state.deepspeed_plugin.deepspeed_config if self.is_deepspeed_enabled else None,
            str(state.fsdp_plugin.state_dict_type) if self.is_fsdp_enabled else None,
        )
        self._step_boundary = StepBoundary()
        self.add_callback(self._step_boundary)

    def _take_model(self, model: Any) -> Any:
        """Check and prepare the model this Trainer trains (given, or built by `model_init`); see CromeTrainer."""
        return model

    def call_model_init(self, trial: Any = None) -> Any:
        """`model_init`'s model, taken as a model given to the Trainer is (a PeftModel around ours adopted)."""
        return self._take_model(adopt_peft_model(super().call_model_init(trial)))

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`; `resume_from_checkpoint=True` takes the last *complete* checkpoint of the output folder
        (one killed while being written is skipped, with a log line), not merely the last one."""
        if kwargs.get("resume_from_checkpoint") is True:
            found = find_last_checkpoint(self.args.output_dir, log=logger.warning)
            if found is None:
                raise ValueError(f"No complete checkpoint in {self.args.output_dir} to resume from.")
            kwargs["resume_from_checkpoint"] = found
        if hasattr(self._unwrapped(), "freeze_backbones"):
            self._unwrapped().freeze_backbones()  # base weights never train, even after in-place quantisation
        report = trainable_report(self._unwrapped())
        total = sum(p.numel() for p in self._unwrapped().parameters())
        lines = ", ".join(f"{name} {count:,}" for name, count in report.items() if name != "total")
        if self.is_world_process_zero():  # one line per run, not one per process
            logger.warning(
                "Trainable parameters: %s of %s (%.3f%%): %s",
                f"{report['total']:,}",
                f"{total:,}",
                100 * report["total"] / total,
                lines,
            )
        try:
            return super().train(*args, **kwargs)
        # BaseException: KeyboardInterrupt too, Ctrl-C must not lose the steps since the last save.
        except BaseException as error:
            self._close_progress_bar()
            self._save_progress_after(error)
            raise

    def _close_progress_bar(self) -> None:
        """Close the training progress bar of a run that stopped (transformers closes it only at the end of a run):
        else it prints itself again at the interpreter's exit, after the error message."""
        for callback in self.callback_handler.callbacks:
            bar = getattr(callback, "training_bar", None)
            if bar is not None:
                bar.close()
                callback.training_bar = None

    def _save_progress_after(self, error: BaseException) -> None:
        """After an error or an interrupt during training (an unreadable image at step 5,000, Ctrl-C), write a
        checkpoint of the steps done since the last one, as a regular `checkpoint-N` that `resume_from_checkpoint`
        continues from, and add a note to the error that says where it is. Not written when nothing is new, in a
        multi-process run (the other processes cannot join a save after one of them failed), or when the error
        came during an optimizer step (the weights would be ahead of the step count); the note then says so. Nor in
        a hyperparameter search, which stops (prunes) trials on purpose."""
        step = self.state.global_step
        folder = os.path.join(self.args.output_dir, f"{CHECKPOINT_PREFIX}{step}")
        if step == 0 or (os.path.isdir(folder) and checkpoint_is_complete(folder) is None):
            return
        if self.hp_search_backend is not None:  # a hyperparameter search stops (prunes) trials on purpose
            return
        if self.args.world_size > 1:
            error.add_note(
                f"mmadapters: the steps since the last checkpoint were not saved: in a run of {self.args.world_size} "
                "processes the others cannot join a save after one failed. Resume from the last checkpoint."
            )
            return
        if not self._step_boundary.between_steps(self.state):
            error.add_note(
                f"mmadapters: training stopped during optimizer step {step + 1}, so its progress was not saved (the "
                "weights were partly updated). Resume from the last checkpoint."
            )
            return
        push_to_hub = self.args.push_to_hub
        self.args.push_to_hub = False  # a rescue stays local: no upload while the run is failing
        try:
            self._save_checkpoint(self.model_wrapped, trial=None)
        except Exception as save_error:  # noqa: BLE001 - the training error is the one to raise
            error.add_note(f"mmadapters: saving the progress of step {step} failed too: {save_error}")
            return
        finally:
            self.args.push_to_hub = push_to_hub
        error.add_note(
            f"mmadapters: training stopped after step {step}; its progress is saved in {folder}. Continue with "
            f"{self.resume_hint}."
        )

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        """Training steps compute logits only at supervised positions (same loss; see
        `mmadapters.modeling.causal_lm_output`); evaluation keeps full logits for metrics.

        With `label_smoothing_factor`, the smoothed loss is taken here against each logit's target (the next token;
        an encoder-decoder CROME's decoder logits against the answer): transformers' Trainer shifts the labels only
        for models in its causal-LM mapping and would score our logits against the unshifted labels, teaching
        every position to repeat its own token."""
        if model.training and "labels" in inputs:
            inputs = {**inputs, "supervised_logits_only": True}
        if self.label_smoother is not None and self.compute_loss_func is None and "labels" in inputs:
            outputs = model(**inputs)
            targets = logit_targets(
                self._unwrapped(), inputs["labels"], bool(inputs.get("supervised_logits_only"))
            )
            loss = self.label_smoother(outputs, targets, num_items_in_batch=num_items_in_batch)
            return (loss, outputs) if return_outputs else loss
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

    def _unwrapped(self) -> Any:
        return self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model

    def _set_signature_columns_if_needed(self) -> None:
        """`remove_unused_columns` keeps the forward's argument names and, with our collator, the raw columns it
        reads (prompt, target, image, ...): transformers' Trainer would drop them and stop with "No columns in
        the dataset match"."""
        super()._set_signature_columns_if_needed()
        if isinstance(self.data_collator, VisionLanguageCollator):
            kept = [*self._signature_columns, *self.data_collator.columns, self.args.length_column_name]
            self._signature_columns = list(dict.fromkeys(kept))

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return super()._get_train_sampler(self._with_sample_lengths(dataset))

    def _get_eval_sampler(self, eval_dataset: Any) -> Any:
        return super()._get_eval_sampler(self._with_sample_lengths(eval_dataset))

    def _with_sample_lengths(self, dataset: Any) -> Any:
        """For `train_sampling_strategy="group_by_length"` / `"batch_rebalance"`: raw rows (prompt, target, image or
        TRL's messages) get a `length_column_name` column counted as our collator builds the samples, since
        transformers infers lengths from `input_ids` alone and stops with "Can only automatically infer lengths".
        A length column of the data set's own is used as it is."""
        import datasets

        if (
            self.args.train_sampling_strategy in ("group_by_length", "batch_rebalance")
            and isinstance(dataset, datasets.Dataset)
            and isinstance(self.data_collator, VisionLanguageCollator)
            and self.args.length_column_name not in dataset.column_names
            and "input_ids" not in dataset.column_names
        ):
            counted = self._counted_datasets.get(id(dataset))
            if counted is None or counted[0] is not dataset:
                lengths = self.data_collator.sample_lengths(dataset)
                counted = (dataset, dataset.add_column(self.args.length_column_name, lengths))
                self._counted_datasets[id(dataset)] = counted
            return counted[1]
        return dataset

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        """LaVIN's recipe (also sensible for CROME): weight decay on matrices only, never on biases and 1-D
        parameters. transformers' `create_optimizer` builds the two groups from these names and keeps everything
        else it honours (`optim`, `optimizer_cls_and_kwargs`, optimizer factories, GaLore-style parameters)."""
        return [name for name, p in model.named_parameters() if p.ndim > 1 and not name.endswith(".bias")]

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoints are adapter-only, like `save_pretrained`; the processor is saved with them. `state_dict`:
        the whole state dict the Trainer gathered (FSDP, DeepSpeed ZeRO-3), where the live module holds a shard."""
        if not self.args.should_save:  # transformers calls _save on every process; only the main one writes
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        self._unwrapped().save_pretrained(output_dir, processor=self.processing_class, state_dict=state_dict)
        # Never a token in a checkpoint: the saved arguments have hub_token removed (a checkpoint is often shared).
        # A shallow copy: TrainingArguments.__post_init__ must not run again (dataclasses.replace would).
        saved_args = copy.copy(self.args)
        saved_args.hub_token = None
        torch.save(saved_args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    # ------------------------------------------------------------------------------------------------
    # Pushing to the Hub (TrainingArguments.push_to_hub, hub_strategy, ...)
    # ------------------------------------------------------------------------------------------------

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Check that this model's checkpoints can be pushed (adapter-only, backbones named by Hub ids, a license
        for the card), then create the repo (`hub_model_id`, default: the output folder's name). transformers'
        __init__ calls this when `push_to_hub=True`: a model that cannot be pushed is refused before training."""
        if not self.is_world_process_zero():
            return
        token = token if token is not None else self.args.hub_token
        model = self._unwrapped()
        self.hub_card_license = check_trainer_can_push(
            model.config.to_dict(), model.backbones_are_referenced(), self.hub_license, token=token
        )
        name = self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))
        private = private if private is not None else self.args.hub_private_repo
        self.hub_model_id = create_repo(name, {"private": private}, token)
        self.push_in_progress = None

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """After each save (hub_strategy other than "end"): the checkpoint's adapters at the repo's root, and with
        "checkpoint" / "all_checkpoints" the whole checkpoint in last-checkpoint/ or checkpoint-N/. One commit,
        made before training goes on (adapter checkpoints are megabytes). A failed push is logged, and training goes
        on: the checkpoint is on disk."""
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        state_in = {
            HubStrategy.CHECKPOINT: LAST_CHECKPOINT_IN_REPO,
            HubStrategy.ALL_CHECKPOINTS: os.path.basename(checkpoint_folder),
        }.get(self.args.hub_strategy)
        try:
            push_trainer_folder(
                checkpoint_folder,
                self.hub_model_id,
                self.hub_card_license,
                token=self.args.hub_token,
                revision=self.args.hub_revision,
                commit_message=f"Training in progress, step {self.state.global_step}",
                trainer_state_in=state_in,
            )
        except PushError as error:
            logger.warning("Could not push %s to the Hub; training goes on: %s", checkpoint_folder, error)

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ) -> str | Future | None:
        """Save the model to the output folder and push its adapter-only checkpoint with our model card; returns
        the commit URL (a Future of it with `blocking=False`). Of transformers' model-card keywords, `license`
        and `tags` go into our card; the others describe transformers' generic card and are refused."""
        card = {name: kwargs.pop(name) for name in ("license", "tags") if name in kwargs}
        if kwargs:
            raise TypeError(
                f"push_to_hub() got {sorted(kwargs)}: these fill transformers' generic model card, and mmadapters "
                "pushes its own (backbones, adapters, a usage snippet). It takes `license` and `tags`."
            )
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:  # no push_to_hub in the arguments: the checks and the repo come now
            # A license given here settles the card's.
            self.hub_license = self.hub_license or card.get("license")
            self.init_hf_repo(token=token, private=private)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        tags = card.get("tags")

        def push() -> str:
            return push_trainer_folder(
                self.args.output_dir,
                self.hub_model_id,
                card.get("license") or self.hub_card_license,
                token=token,
                revision=revision or self.args.hub_revision,
                commit_message=commit_message,
                tags=[tags] if isinstance(tags, str) else tags,
            )

        if blocking:
            return push()
        pool = ThreadPoolExecutor(max_workers=1)
        future = pool.submit(push)
        pool.shutdown(wait=False)  # the push runs to its end; the pool takes no more work
        return future

    # ------------------------------------------------------------------------------------------------
    # Resuming
    # ------------------------------------------------------------------------------------------------

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        # Under FSDP the Trainer passes the wrapped model (after accelerator.prepare); else nothing.
        wrapped = model or self._unwrapped()
        load_adapter_checkpoint(resume_from_checkpoint, self.accelerator.unwrap_model(wrapped), wrapped)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint, self.model_wrapped)  # FSDP: the wrapper


class LavinTrainer(AdapterTrainer):
    """Trainer for `LavinForConditionalGeneration`; logs the LLM routing weights per modality.

    `text_distillation` (ours, not in the paper; default 0 = off): the weight of an extra loss on the batch's
    text-only samples, the KL divergence from the frozen LLM's next-token distributions (the same model with the
    adapters bypassed: routing weights of zero make every MM-Adapter the identity) to the adapted model's, at
    every token. It asks the text modality to stay what the LLM was, beyond the mixture's answers. One process
    only (the extra forward would bypass DDP's gradient synchronisation)."""

    def __init__(self, *args: Any, text_distillation: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if text_distillation < 0:
            raise ValueError(f"text_distillation is a loss weight (>= 0), got {text_distillation}.")
        if text_distillation and self.args.world_size > 1:
            raise ValueError(
                "text_distillation runs in one process only; drop it for multi-process training."
            )
        self.text_distillation = text_distillation

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        distilling = self.text_distillation and model.training
        return_outputs = kwargs.get("return_outputs", False) or (len(args) > 0 and bool(args[0]))
        labels = inputs.get("labels")
        if distilling and not return_outputs and labels is not None and not bool((labels != -100).any()):
            # Only unsupervised text-only samples (VisionLanguageCollator(supervise_text_only=False)): their
            # loss is the distillation alone (a cross-entropy over no tokens would be 0 / 0).
            result = None
        else:
            result = super().compute_loss(model, inputs, *args, **kwargs)
        if not distilling:
            return result
        lavin = self._unwrapped()
        text_rows = ~(inputs["input_ids"] == lavin.config.image_token_id).any(dim=-1)
        if not bool(text_rows.any()):
            return result
        distillation = self.text_distillation * text_distillation_loss(
            lavin, inputs["input_ids"][text_rows], inputs["attention_mask"][text_rows]
        )
        if result is None:
            return distillation
        if isinstance(result, tuple):
            return (result[0] + distillation, *result[1:])
        return result + distillation

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        model = self._unwrapped()
        if isinstance(model, LavinForConditionalGeneration) and "loss" in logs:
            with torch.no_grad():
                table = model.compute_routing_table()  # (modality, layer, site, expert)
            logs["router/text_expert_b"] = round(table[0, ..., 0].mean().item(), 4)
            logs["router/image_expert_b"] = round(table[1, ..., 0].mean().item(), 4)
        super().log(logs, *args, **kwargs)


def text_distillation_loss(
    model: LavinForConditionalGeneration, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Mean over the real tokens of KL(frozen LLM || LaVIN) between next-token distributions, for text-only
    sequences; the frozen LLM is LaVIN with zero routing weights (every MM-Adapter then the identity)."""
    num_layers, sites = len(model.llm_adapters), model.config.mm_adapter_config.sites_per_layer
    bypass = torch.zeros(input_ids.shape[0], num_layers, sites, 2, device=input_ids.device)
    with torch.no_grad():
        teacher = model(
            input_ids=input_ids, attention_mask=attention_mask, routing_weights=bypass
        ).logits.float()
    student = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    per_token = torch.nn.functional.kl_div(
        student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)
    mask = attention_mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


class CromeTrainer(AdapterTrainer):
    """Trainer for `CromeForConditionalGeneration`; `stage` sets what trains (see `set_stage`)."""

    def __init__(self, *args: Any, stage: str = "finetune", **kwargs: Any) -> None:
        self.stage = stage
        super().__init__(*args, **kwargs)

    def _take_model(self, model: Any) -> Any:
        if not isinstance(model, CromeForConditionalGeneration):
            raise TypeError(
                f"CromeTrainer trains a CromeForConditionalGeneration, got {type(model).__name__}."
            )
        refuse_trl_trainer_without_qformer_inputs(type(self))
        model.set_stage(self.stage)
        return model


def refuse_trl_trainer_without_qformer_inputs(trainer_class: type) -> None:
    """Refuse, before anything runs, a TRL trainer that hands the model a fixed set of image inputs (GRPO, RLOO:
    `_get_per_token_logps_and_entropies` names each one it passes on), since those leave out CROME's Q-Former
    instruction: GRPO stopped at the first step, after generating, and RLOO with a TypeError of its own."""
    for kind in trainer_class.__mro__:
        scoring = kind.__dict__.get("_get_per_token_logps_and_entropies")
        if kind.__module__.startswith("trl.") and scoring is not None:
            passed_on = inspect.signature(scoring).parameters
            if "qformer_input_ids" not in passed_on and not any(
                parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in passed_on.values()
            ):
                raise ValueError(
                    f"TRL's {kind.__name__} hands the model a fixed set of image inputs (pixel_values, "
                    "image_grid_thw, ...), not the Q-Former instruction (qformer_input_ids) nor the prompt_mask that "
                    "CROME reads, so it cannot train CROME. Train CROME with CromeTrainer or its mixes with TRL's "
                    "SFTTrainer, DPOTrainer or KTOTrainer; LaVIN trains under "
                    f"{kind.__name__} (class LavinRLTrainer(LavinTrainer, {kind.__name__}))."
                )
