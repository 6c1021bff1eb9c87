"""The reference model of TRL's trainers mixed with ours, without a second copy of the backbones.

Given no `ref_model`, TRL's DPO and KTO load the whole model again from the checkpoint it came from (for a 7B LLM,
13 GB more in bfloat16), or stop when there is none (a model built with `from_backbones`); RLOO and GRPO, which take
no `ref_model`, do the same whenever `beta` > 0 (RLOO's default is 0.05). Here only the adapters train, so the
reference is the model being trained, run with the trainable weights it had when the Trainer was created: those
few megabytes are all that is copied. During the reference's forward the trained weights are set aside and put
back exactly afterwards (through `.data`, which autograd does not track: the policy's graph of the same step sees
its own values again at backward), and the model runs in evaluation mode, as a separate reference would.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class InitialWeightsReference(nn.Module):
    """A TRL reference model: `policy` with the trainable weights it had when this was built.

    The policy is not a submodule, so what TRL does to its reference (dropout off, device placement, evaluation
    mode) leaves the policy as it is; the reference holds no parameters of its own."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.__dict__["policy"] = policy  # not registered: see the class docstring
        self._initial = [(p, p.detach().clone()) for p in policy.parameters() if p.requires_grad]
        if not self._initial:
            raise ValueError(
                "The model has no trainable weights, so it is its own reference: pass ref_model=."
            )

    @property
    def config(self) -> Any:
        return self.policy.config

    def get_output_embeddings(self) -> nn.Module:
        return self.policy.get_output_embeddings()

    @property
    def base_model(self) -> Any:
        """The policy's body (TRL's fused LM head runs it, then the frozen head), with the initial weights."""
        body = self.policy.base_model

        def run(*args: Any, **kwargs: Any) -> Any:
            with self.initial_weights():
                return body(*args, **kwargs)

        return run

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.initial_weights():
            return self.policy(*args, **kwargs)

    @contextlib.contextmanager
    def initial_weights(self) -> Iterator[None]:
        """The policy with its initial trainable weights and in evaluation mode, inside the block."""
        # Kept where the weights are (the Trainer moves the model to its device after this was built).
        self._initial = [(p, initial.to(p.device)) for p, initial in self._initial]
        trained = [p.data.clone() for p, _ in self._initial]
        training = self.policy.training
        with torch.no_grad():
            for parameter, initial in self._initial:
                parameter.data.copy_(initial)
        self.policy.eval()
        try:
            yield
        finally:
            with torch.no_grad():
                for (parameter, _), value in zip(self._initial, trained, strict=True):
                    parameter.data.copy_(value)
            self.policy.train(training)


def trl_class_taking_a_reference(trainer_class: type) -> type | None:
    """The TRL trainer among `trainer_class`'s bases whose `__init__` takes `ref_model` (DPO, KTO), if any."""
    for kind in trainer_class.__mro__:
        if kind.__module__.startswith("trl.") and "ref_model" in inspect.signature(kind.__init__).parameters:
            return kind
    return None


# TRL's trainers that take no `ref_model` and load their reference model themselves when `beta` > 0. (Others have a
# `beta` of another meaning, such as the distillation trainer's, and load other models with the same function.)
LOADING_THEIR_REFERENCE = ("GRPOTrainer", "RLOOTrainer")


def trl_class_loading_its_reference(trainer_class: type, training_args: Any) -> type | None:
    """The TRL trainer among `trainer_class`'s bases that loads its reference itself (RLOO, GRPO) because
    `training_args.beta` is not 0, if any."""
    if not getattr(training_args, "beta", 0.0):
        return None
    for kind in trainer_class.__mro__:
        if kind.__module__.startswith("trl.") and kind.__name__ in LOADING_THEIR_REFERENCE:
            return kind
    return None


@contextlib.contextmanager
def reference_instead_of_loading(trl_class: type, policy: nn.Module) -> Iterator[None]:
    """Inside the block, where `trl_class`'s `__init__` loads its reference from the policy's checkpoint, it gets
    `InitialWeightsReference(policy)` instead; TRL then treats it as its own (dropout off, fused LM head, device
    placement). RLOO and GRPO take no `ref_model`, so this is the one place to give it. Other models the function
    loads (a policy given by name) are loaded as before."""
    module = sys.modules[trl_class.__module__]
    load = getattr(module, "create_model_from_path", None)
    if load is None:  # a TRL release that loads it otherwise: left to TRL (tests/test_trl.py would say)
        yield
        return
    policy_id = getattr(policy.config, "_name_or_path", "")

    def load_or_share(model_id: Any, *args: Any, **kwargs: Any) -> nn.Module:
        if model_id == policy_id:
            return InitialWeightsReference(policy)
        return load(model_id, *args, **kwargs)

    module.create_model_from_path = load_or_share
    try:
        yield
    finally:
        module.create_model_from_path = load


def shares_the_policy_safely(training_args: Any) -> bool:
    """Whether the initial-weights reference applies: not when the weights are sharded (FSDP, DeepSpeed: the
    reference TRL builds is sharded as well), nor with TRL's `sync_ref_model`, which moves a reference of its own
    towards the policy."""
    if training_args is None:
        return True
    return not (
        getattr(training_args, "fsdp", None)
        or getattr(training_args, "deepspeed", None)
        or getattr(training_args, "sync_ref_model", False)
    )
