"""PEFT layers (LoRA or any method PEFT can inject) on the frozen backbones of LaVIN and CROME, trained and saved
together with our own adapters.

How it works: PEFT's layers are injected into the backbone(s) in place (`peft.inject_adapter_in_model`, no
`PeftModel` wrapper), and the model's config records each injection (`config.peft_adapters`: adapter name ->
where it was injected and its PEFT config). Because the record is in config.json, every load rebuilds the same
layers before the weights are read (`FrozenBackbonesPreTrainedModel.post_init`), and the adapter-only checkpoint
holds the PEFT tensors next to ours: one folder, one `from_pretrained`.

Three ways in, all ending in that record:
- `add_lora(model, LoraConfig(...), on="language_model")` / `model.add_adapter(config)`: scoped to one backbone
  ("language_model", "vision_tower" or "both"), so `target_modules=["q_proj", "v_proj"]` means the LLM's
  projections, not CLIP's too.
- `model.load_adapter(peft_folder_or_repo)`: a PEFT adapter saved by PEFT, trained on the bare LLM (loaded into
  the LLM) or on one of our models through `get_peft_model` (loaded where it was trained).
- `adopt_peft_model(get_peft_model(model, config))`: a plain PEFT wrapper (our Trainers call it): our modules are
  made trainable again (PEFT froze them) and the PEFT layers recorded.

transformers' own `add_adapter` / `load_adapter` are replaced here rather than inherited: transformers 5.24
requires peft >= 0.22 for them (unreleased as of this writing), injects into the whole model, and its save
would write PEFT's tensors only, dropping ours.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..checkpoint_files import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAMES, is_peft_tensor_name
from ..errors import MMAdaptersError

logger = logging.get_logger(__name__)

# Where PEFT layers may go: a backbone, both, or "" (the whole model: what get_peft_model on our model did).
SCOPES = {
    "language_model": ("language_model",),
    "vision_tower": ("vision_tower",),
    "both": ("language_model", "vision_tower"),
    "": ("",),
}


class PeftOnTopError(MMAdaptersError, ValueError):
    """A PEFT adapter that cannot be added, loaded or saved as asked."""


def refuse_peft_tensors_of_another_model(model: nn.Module, state_dict: dict[str, Any], prefix: str) -> None:
    """Called as `model` loads a state dict (torch's `_load_from_state_dict`, with `prefix` its place in the module
    being loaded): PEFT layers' tensors named after modules the model does not have belong to an adapter of another
    model. `PeftModel.from_pretrained(model, folder)` with an adapter trained on the bare LLM (tensors named
    `model.layers.0...`) got only PEFT's "Found missing adapter keys" warning, and its new LoRA stayed at its start
    (doing nothing)."""
    own = set(model._modules) | set(model._parameters) | set(model._buffers)
    foreign = sorted(
        key[len(prefix) :]
        for key in state_dict
        if key.startswith(prefix)
        and key[len(prefix) :].split(".", 1)[0] not in own
        and is_peft_tensor_name(key)
    )
    if not foreign:
        return
    # PEFT has already wrapped the layers for the adapter. Created on the meta device (low_cpu_mem_usage=True), they
    # hold nothing and leave the model unable to run or save: taken out again. Otherwise they sit at PEFT's start,
    # which changes no output, as after PEFT's own failed loads.
    recorded = set(getattr(model.config, "peft_adapters", None) or {})
    for name in sorted(adapter_names_in(model) - recorded):
        tensors = [
            p for key, p in model.named_parameters() if is_peft_tensor_name(key) and f".{name}." in key
        ]
        if tensors and all(p.is_meta for p in tensors):
            _take_out(model, name, set())
            held = vars(model).get("peft_config")
            if held is not None:
                held.pop(name, None)
                if not held:
                    del model.peft_config
    raise PeftOnTopError(
        f"The adapter's tensors name modules {type(model).__name__} does not have ({foreign[0]}, ... "
        f"{len(foreign)} in all): it was trained on another model, such as the bare LLM or vision tower. Load it "
        "with model.load_adapter(folder) (it goes into the LLM; on='vision_tower' for one of the bare tower). "
        "PeftModel.from_pretrained(model, folder) takes adapters trained on this model (get_peft_model)."
    )


def peft_imported() -> bool:
    """Whether PEFT is imported. Until it is, no PEFT layer or PeftModel can exist, so the checks that look for them
    answer without importing it: importing PEFT imports bitsandbytes, which on a CPU tries to fetch a kernel from the
    Hub and logs its failure, in the middle of a generate that uses neither."""
    return "peft" in sys.modules


def tuner_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of every PEFT layer inside `module`."""
    if not peft_imported():
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer as base

    return [(name, sub) for name, sub in module.named_modules() if isinstance(sub, base)]


def adapter_names_in(module: nn.Module) -> set[str]:
    """Names of the PEFT adapters whose layers are inside `module`."""
    names: set[str] = set()
    for _, layer in tuner_layers(module):
        names.update(layer._all_available_adapter_names())
    return names


def peft_state_prefixes(module: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the PEFT tensors inside `module` (e.g. "...q_proj.lora_A.")."""
    prefixes = []
    for name, layer in tuner_layers(module):
        for attr in (*layer.adapter_layer_names, *layer.other_param_names):
            prefixes.append(f"{name}.{attr}." if name else f"{attr}.")
    return tuple(prefixes)


def peft_config_to_dict(peft_config: Any) -> dict[str, Any]:
    """A PEFT config as JSON-safe values (sets become sorted lists, enums their values)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (set, frozenset)):
            return sorted(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if hasattr(value, "value") and type(value).__module__.startswith("peft"):
            return value.value  # PeftType / TaskType enums
        return value

    values = plain(peft_config.to_dict())
    json.dumps(values)  # fail here, not in save_pretrained, if something is not serialisable
    return values


def peft_config_from_dict(values: dict[str, Any]) -> Any:
    from peft import PeftConfig

    return PeftConfig.from_peft_type(**copy.deepcopy(values))


def _targets(model: nn.Module, on: str) -> list[tuple[str, nn.Module]]:
    if on not in SCOPES:
        raise PeftOnTopError(
            f"on={on!r}: PEFT layers go on 'language_model' (the LLM), 'vision_tower' or 'both'."
        )
    return [(name, model if name == "" else getattr(model, name)) for name in SCOPES[on]]


def _check_supported(peft_config: Any) -> None:
    """Refuse, before anything trains, a PEFT method that a checkpoint could not rebuild: a load injects each
    recorded adapter again with `inject_adapter_in_model` and reads every layer's tensors from the file."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    name = type(peft_config).__name__
    if getattr(peft_config, "is_prompt_learning", False) or getattr(peft_config, "is_adaption_prompt", False):
        raise PeftOnTopError(
            f"{name} is a prompt-learning method: it needs a PeftModel around a text model and cannot sit inside "
            "a frozen backbone. Use a method that injects layers (LoRA, LoHa, IA3, ...)."
        )
    tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_config.peft_type)
    if tuner is None:
        raise PeftOnTopError(f"{name}: PEFT cannot inject {peft_config.peft_type} layers into a model.")
    # Recent PEFT marks the methods that share state between layers; check_layers_share_nothing finds the others.
    if getattr(tuner, "uses_shared_state", False):
        raise PeftOnTopError(shared_state_message(name, ["PEFT keeps them on its tuner"]))
    if getattr(peft_config, "modules_to_save", None):
        raise PeftOnTopError(
            f"modules_to_save={peft_config.modules_to_save}: not needed for our own modules (they always train and "
            "are saved with the PEFT layers), and backbone modules do not train here. Remove modules_to_save."
        )


def _check_backbone_weights_stay_frozen(peft_config: Any) -> None:
    """Refuse, when an adapter is added, a PEFT option that trains the backbones' own weights: they stay frozen
    here (our Trainers freeze them again) and an adapter-only checkpoint does not hold them. Checkpoints that
    record such an option still load (it never trained anything here)."""
    bias = getattr(peft_config, "bias", "none")
    if bias not in (None, "none"):
        which = "every one" if bias == "all" else "those of the adapted layers"
        raise PeftOnTopError(
            f"{type(peft_config).__name__}(bias={bias!r}) trains the backbones' biases ({which}), which stay frozen "
            "here. Use bias='none' (a LoraConfig's lora_bias=True gives the LoRA layers trained biases of their own)."
        )


def shared_state_message(method: str, shared: list[str]) -> str:
    return (
        f"{method} shares tensors between the layers it adapts ({', '.join(shared[:3])}): our checkpoints hold each "
        "layer's PEFT tensors, so a save could not keep them and a load could not rebuild them. Use a method "
        "whose layers are independent (LoRA, DoRA, LoHa, LoKr, IA3, OFT, ...); PEFT's own PeftModel.save_pretrained "
        "saves this one without our modules."
    )


def check_layers_share_nothing(module: nn.Module, method: str) -> None:
    """Refuse PEFT layers inside `module` that share a tensor (VeRA's or RandLoRA's projections, VB-LoRA's vector
    bank): found from the tensors themselves, so that methods PEFT does not mark are caught too."""
    names_by_storage: dict[tuple, list[str]] = {}
    prefixes = peft_state_prefixes(module)
    for name, tensor in module.state_dict(keep_vars=True).items():
        if prefixes and name.startswith(prefixes) and tensor.numel() and not tensor.is_meta:
            storage = (tensor.device, tensor.untyped_storage().data_ptr())
            names_by_storage.setdefault(storage, []).append(name)
    shared = [names[0] for names in names_by_storage.values() if len(names) > 1]
    if shared:
        raise PeftOnTopError(shared_state_message(method, shared))


def inject_peft_layers(
    model: nn.Module, peft_config: Any, adapter_name: str, on: str, record: bool = True
) -> None:
    """Inject PEFT layers described by `peft_config` into `model`'s backbone(s) `on`, leaving which of our own
    parameters train unchanged, and (with `record`) note the injection in `model.config.peft_adapters`."""
    _check_supported(peft_config)
    if record:
        _check_backbone_weights_stay_frozen(peft_config)
    recorded = dict(getattr(model.config, "peft_adapters", None) or {})
    if record and adapter_name in recorded:
        raise PeftOnTopError(
            f"The model already has a PEFT adapter named {adapter_name!r}; pass another adapter_name, or remove "
            f"it first with model.delete_adapter({adapter_name!r})."
        )
    own = [p for n, p in model.named_parameters() if n.split(".", 1)[0] in model.adapter_module_names()]
    trains = [p.requires_grad for p in own]
    config = copy.deepcopy(peft_config)
    with _undone_on_failure(model, adapter_name):  # all backbones or none: "both" never half-injects
        for scope, target in _targets(model, on):
            _inject_into(target, scope, config, adapter_name, type(peft_config).__name__)
    for parameter, trained in zip(own, trains, strict=True):
        parameter.requires_grad_(trained)
    if record:
        recorded[adapter_name] = {"on": on, "config": peft_config_to_dict(peft_config)}
        model.config.peft_adapters = recorded


def _inject_into(target: nn.Module, scope: str, config: Any, adapter_name: str, method: str) -> None:
    """Inject one adapter into one backbone (undone by the caller's `_undone_on_failure` if anything fails)."""
    from peft import inject_adapter_in_model

    # PEFT warns "Make sure to know what you are doing!" when the target already holds a `peft_config` from an
    # earlier injection. A second named adapter is what add_adapter is for (the name was checked before, and
    # PeftModel.add_adapter does not warn either), and rebuilding recorded adapters at load adds nothing new: the
    # earlier configs are set aside for the injection and put back after it (after a failure the caller's
    # `_undone_on_failure` puts them back).
    earlier = vars(target).pop("peft_config", {})
    try:
        inject_adapter_in_model(config, target, adapter_name=adapter_name)
    except ValueError as error:
        where = "the whole model" if scope == "" else scope
        raise PeftOnTopError(
            f"PEFT found nothing to adapt in {where}: {error} Module names there look like "
            f"{_example_names(target)}."
        ) from None
    if earlier:
        target.peft_config = {**earlier, **target.peft_config}
    if adapter_name not in adapter_names_in(target):
        raise PeftOnTopError(f"{method} injected no layer into {scope or 'the model'}.")
    check_layers_share_nothing(target, method)


@contextlib.contextmanager
def _undone_on_failure(model: nn.Module, adapter_name: str) -> Iterator[None]:
    """If the block fails, take the adapter `adapter_name` out again and give the model back its PEFT state: a
    failed add or load (no module to adapt, a file from another base model) leaves the model computing, training
    and saving what it did. PEFT makes a new adapter the active one on every layer, earlier adapters' too, so the
    active adapters, what trains, the `peft_config` dicts and the record are all noted first."""
    layers = tuner_layers(model)
    active = [(layer, list(layer.active_adapters)) for _, layer in layers]
    trains = {name: p.requires_grad for name, p in model.named_parameters()}
    holders = [model, *(getattr(model, name) for name in SCOPES["both"])]
    configs = [(holder, dict(vars(holder).get("peft_config") or {})) for holder in holders]
    record = copy.deepcopy(getattr(model.config, "peft_adapters", None))
    try:
        yield
    except BaseException:
        for layer, names in active:  # first, so that PEFT does not warn of deleting an active adapter
            layer.set_adapter(names)
        _take_out(model, adapter_name, {name for name, _ in layers})
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trains.get(name, False))
        for holder, held in configs:
            if held:
                holder.peft_config = held
            elif "peft_config" in vars(holder):
                del holder.peft_config
        model.config.peft_adapters = record
        raise


def _take_out(model: nn.Module, adapter_name: str, wrapped_before: set[str]) -> None:
    """Remove the adapter just injected: its tensors from every layer, and the layers PEFT wrapped for it alone
    (those not in `wrapped_before`, which may be empty wrappers an earlier adapter left) back to the plain ones."""
    for name, layer in tuner_layers(model):
        if adapter_name not in layer._all_available_adapter_names():
            continue
        layer.delete_adapter(adapter_name)
        if name not in wrapped_before and not layer._all_available_adapter_names():
            parent_name, _, child_name = name.rpartition(".")
            setattr(
                model.get_submodule(parent_name) if parent_name else model, child_name, layer.get_base_layer()
            )


def _example_names(module: nn.Module) -> list[str]:
    leaves = sorted(
        {name.rsplit(".", 1)[-1] for name, sub in module.named_modules() if isinstance(sub, nn.Linear)}
    )
    return leaves[:12]


def rebuild_recorded_layers(model: nn.Module) -> None:
    """Inject the PEFT layers that `model.config.peft_adapters` records (at construction, before loading), and
    make active the adapters that were active when the checkpoint was saved (a checkpoint that does not record it,
    saved by an earlier version, gets the last adapter injected, as after `add_adapter`)."""
    recorded = in_injection_order(getattr(model.config, "peft_adapters", None) or {})
    for adapter_name, entry in recorded.items():
        if adapter_name in adapter_names_in(model):
            continue
        inject_peft_layers(
            model, peft_config_from_dict(entry["config"]), adapter_name, entry["on"], record=False
        )
    if recorded:
        model.config.peft_adapters = recorded  # later additions come after these, as when they were added
    if any("active" in entry for entry in recorded.values()):
        model.set_adapter([name for name, entry in recorded.items() if entry.get("active")])


def in_injection_order(recorded: dict[str, Any]) -> dict[str, Any]:
    """The record's adapters in the order they were injected. Two PEFT methods on one module nest in that order
    (the later one wraps the earlier, e.g. a LoRA around an OFT layer), and their tensors are named by the
    nesting, so a load must inject them in the same order. config.json is written with sorted keys: each entry
    keeps its place in `"order"` (records written before it existed keep the file's order)."""
    places = {name: place for place, name in enumerate(recorded)}
    return dict(sorted(recorded.items(), key=lambda item: item[1].get("order", places[item[0]])))


def rebuild_layers_with_lost_buffers(model: nn.Module) -> None:
    """After a full checkpoint's load: give back the PEFT layers their non-persistent buffers.

    transformers builds a full checkpoint's model on the meta device and fills every non-persistent buffer with
    uninitialised memory, for `_init_weights` to compute again (as it does for its own modules' buffers, e.g.
    rotary frequencies). PEFT computes such buffers once, when it creates a layer (OFT's and PSOFT's
    upper-triangle indices, ...), and nothing computed them again: a reloaded OFT read garbage indices. Every
    adapter of a layer with such buffers is injected again into the backbones, now loaded (the way an adapter-only
    checkpoint rebuilds its layers), and given back the tensors the checkpoint loaded into it."""
    layers = tuner_layers(model)
    lost = sorted(
        {
            adapter
            for _, layer in layers
            if _has_non_persistent_buffers(layer)
            for adapter in layer._all_available_adapter_names()
        }
    )
    if not lost:
        return
    loaded = {
        f"{name}.{key}": tensor
        for name, layer in layers
        for key, tensor in layer.state_dict().items()
        if not key.startswith("base_layer.")
    }
    active = [(layer, list(layer.active_adapters)) for _, layer in layers]
    recorded = model.config.peft_adapters or {}
    for adapter_name in lost:
        entry = recorded[adapter_name]
        config = peft_config_from_dict(entry["config"])
        for scope, target in _targets(model, entry["on"]):
            with _nested_layers_in_place(target, adapter_name):
                _inject_into(target, scope, config, adapter_name, type(config).__name__)
    unexpected = model.load_state_dict(loaded, strict=False).unexpected_keys
    if unexpected:
        raise PeftOnTopError(f"PEFT layers rebuilt after loading lack the loaded tensors {unexpected[:3]}.")
    for layer, names in active:
        layer.set_adapter(names)


@contextlib.contextmanager
def _nested_layers_in_place(target: nn.Module, adapter_name: str) -> Iterator[None]:
    """For the block, put each PEFT layer holding `adapter_name` that sits inside another PEFT layer (two methods on
    one module: a LoRA around an OFT layer) in the outer layer's place, where PEFT's injection finds it by the
    module's name and updates it (rather than wrapping the outer layer once more); the outer layers go back after."""
    swaps = []
    for name, layer in tuner_layers(target):
        if name.endswith(".base_layer") and adapter_name in layer._all_available_adapter_names():
            place = name
            while place.endswith(".base_layer"):
                place = place.removesuffix(".base_layer")
            parent_name, _, child_name = place.rpartition(".")
            parent = target.get_submodule(parent_name) if parent_name else target
            swaps.append((parent, child_name, getattr(parent, child_name), layer))
    for parent, child_name, _, layer in swaps:
        setattr(parent, child_name, layer)
    try:
        yield
    finally:
        for parent, child_name, outer, _ in swaps:
            setattr(parent, child_name, outer)


# PEFT methods whose layers cannot be created while transformers builds a full checkpoint's model on the meta device
# (BOFT computes its permutation matrices with `.item()`): a full checkpoint holding them could not load.
NOT_BUILDABLE_ON_META = ("BOFT",)


def check_full_checkpoint_can_rebuild(model: nn.Module) -> None:
    """Refuse, before anything is written, a full save of PEFT layers that its load could not rebuild."""
    for adapter_name, entry in (model.config.peft_adapters or {}).items():
        peft_type = entry["config"].get("peft_type")
        if peft_type in NOT_BUILDABLE_ON_META:
            raise PeftOnTopError(
                f"The PEFT adapter {adapter_name!r} is {peft_type}, whose layers cannot be rebuilt by a full "
                "checkpoint's load (transformers builds that model on the meta device, where PEFT cannot create "
                f"{peft_type} layers). Save adapter-only (save_pretrained(folder), backbones loaded by name), or use "
                "OFT, whose full checkpoints load."
            )


def _has_non_persistent_buffers(layer: nn.Module) -> bool:
    """Whether a PEFT layer's own modules (its base layer left out) hold non-persistent buffers."""
    return any(
        module._buffers.get(name) is not None
        for prefix, module in layer.named_modules()
        if not prefix.startswith("base_layer")
        for name in module._non_persistent_buffers_set
    )


def add_lora(
    model: nn.Module, peft_config: Any, on: str = "language_model", adapter_name: str = "default"
) -> Any:
    """Put PEFT layers (a `LoraConfig`, or any config of a PEFT method that injects layers) on a LaVIN or CROME
    model's backbone(s) `on` ("language_model", "vision_tower" or "both"). Our own modules keep training; the PEFT
    layers train too and are saved with the adapters by `save_pretrained`. Returns the model (changed in place)."""
    _check_our_model(model)
    inject_peft_layers(model, peft_config, adapter_name, on)
    return model


def load_peft_adapter(
    model: nn.Module,
    peft_model_id: str | os.PathLike | None = None,
    adapter_name: str | None = None,
    on: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    is_trainable: bool = False,
    peft_config: Any = None,
    adapter_state_dict: dict[str, torch.Tensor] | None = None,
) -> Any:
    """Load an adapter saved by PEFT (`PeftModel.save_pretrained`, a folder or Hub repo) onto `model`, or, as in
    transformers, one given as `adapter_state_dict` (PEFT's saved form, e.g. from `get_adapter_state_dict`) with its
    `peft_config`. A `peft_config` given with a folder replaces the folder's.

    Where it goes: an adapter trained on one of our models (its tensor names start with `language_model.` or
    `vision_tower.`) goes where it was trained; any other adapter was trained on the bare LLM and goes into the
    LLM (`on` can say "vision_tower" for one trained on the bare vision tower). Every tensor must find its place.
    """
    download = {"revision": revision, "token": token}
    adapter = read_peft_adapter(model, peft_model_id, on, download, peft_config, adapter_state_dict)
    place_peft_adapter(model, adapter, adapter_name or "default", is_trainable)
    return model


def place_peft_adapter(model: nn.Module, adapter: PeftAdapter, name: str, is_trainable: bool) -> None:
    """Inject the layers of an adapter read by `read_peft_adapter` and load its tensors into them (all or nothing)."""
    adapter.config.inference_mode = not is_trainable
    with _undone_on_failure(model, name):  # tensors that do not fit leave no adapter behind
        inject_peft_layers(model, adapter.config, name, adapter.scope)
        _load_peft_tensors(model, adapter.scope, name, adapter.state, adapter.source)
    if not is_trainable:
        for _, layer in tuner_layers(model):
            if name in layer._all_available_adapter_names():
                layer.set_adapter(layer.active_adapters, inference_mode=True)


@dataclasses.dataclass
class PeftAdapter:
    """A PEFT adapter read from its files (or given as a state dict): where it came from (for messages), its config
    (a copy: the caller's is left as it was), its tensors in PEFT's saved form (keys relative to the module it was
    trained on) and where in our model that module is (`scope`: "" for one trained on our whole model)."""

    source: str
    config: Any
    state: dict[str, torch.Tensor]
    scope: str


def read_peft_adapter(
    model: nn.Module,
    peft_model_id: str | os.PathLike | None,
    on: str | None,
    download: dict[str, Any],
    peft_config: Any,
    adapter_state_dict: dict[str, torch.Tensor] | None,
) -> PeftAdapter:
    """Read a PEFT adapter for `load_peft_adapter` (and a hotswap) and decide where in `model` it goes. `download`:
    the keywords of its download (see `_peft_folder`)."""
    from peft import PeftConfig

    _check_our_model(model)
    if (peft_model_id is None) == (adapter_state_dict is None) or (
        adapter_state_dict is not None and peft_config is None
    ):
        raise PeftOnTopError(
            "load_adapter takes peft_model_id (a folder or Hub repo that PeftModel.save_pretrained wrote), or "
            "adapter_state_dict together with its peft_config; not both, not neither."
        )
    if adapter_state_dict is not None:
        source, state = "adapter_state_dict", dict(adapter_state_dict)
    else:
        source = str(peft_model_id)
        folder = _peft_folder(os.fspath(peft_model_id), download)
        if os.path.isfile(os.path.join(folder, "config.json")) and not os.path.isfile(
            os.path.join(folder, PEFT_CONFIG_NAME)
        ):
            raise PeftOnTopError(
                f"'{peft_model_id}' is not a PEFT adapter (no adapter_config.json). An mmadapters checkpoint is "
                "loaded with from_pretrained, not load_adapter."
            )
        peft_config = PeftConfig.from_pretrained(folder) if peft_config is None else peft_config
        state = _read_peft_weights(folder)
    state = {_strip_wrapper_prefix(key): value for key, value in state.items()}
    trained_on_ours = any(key.startswith(("language_model.", "vision_tower.")) for key in state)
    if trained_on_ours and on not in (None, ""):
        raise PeftOnTopError(
            f"'{source}' was trained on a whole {type(model).__name__} (its tensors name language_model / "
            f"vision_tower): it goes back where it was trained; drop on={on!r}."
        )
    scope = "" if trained_on_ours else (on or "language_model")
    if scope in ("", *SCOPES["both"]):
        state = _without_backbone_copies(model if scope == "" else getattr(model, scope), state, source)
    return PeftAdapter(source, copy.deepcopy(peft_config), state, scope)


def _without_backbone_copies(
    target: nn.Module, state: dict[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """The adapter's tensors without the copies of base-model weights that PEFT writes beside them: with
    `save_embedding_layers="auto"` (its default) the embedding matrices, when the adapter targets `embed_tokens` /
    `lm_head` or the vocabulary was resized. The backbones stay frozen here, so a copy equal to the backbone's
    weight is dropped and a different one (a resized vocabulary, another base model) refused by name."""

    def plain(name: str) -> str:  # a weight's name as the unwrapped backbone has it (PEFT layers may nest)
        while ".base_layer." in name:
            name = name.replace(".base_layer.", ".")
        return name

    backbone = {plain(name): held for name, held in target.state_dict().items()}
    kept = {}
    for key, value in state.items():
        held = backbone.get(plain(key))
        if held is None or held.is_meta:
            kept[key] = value
        elif held.shape == value.shape and torch.equal(value.to(held.device, held.dtype), held):
            continue
        else:
            raise PeftOnTopError(
                f"The PEFT adapter '{source}' holds a copy of the base model's {key} that differs from this "
                "backbone's (PEFT saves the embedding matrices with an adapter that targets embed_tokens / "
                "lm_head, or after the vocabulary was resized). The backbones stay frozen here: load it onto the "
                "base model it was trained on, or, if that model's embeddings were not changed, save the adapter "
                "with save_embedding_layers=False."
            )
    return kept


def saved_form(target: nn.Module, name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors in `target` (a module PEFT injected into; `state` keyed relative to it) as PEFT saves
    them (`get_peft_model_state_dict`): the adapter name left out of the keys, each method's own renames (DoRA's
    magnitude vector) and omissions (AdaLoRA's `ranknum`) applied."""
    from peft import get_peft_model_state_dict

    # This adapter's entries only: each PEFT layer holds one per adapter name (e.g. "...q_proj.lora_A.<name>.weight"),
    # and PEFT knows only the adapters injected into this same module.
    entries = tuple(f"{prefix}{name}" for prefix in peft_state_prefixes(target))
    own = {
        key: value
        for key, value in state.items()
        if key in entries or key.startswith(tuple(f"{entry}." for entry in entries))
    }
    return get_peft_model_state_dict(target, state_dict=own, adapter_name=name, save_embedding_layers=False)


def peft_adapter_state_dict(
    model: nn.Module, name: str, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """PEFT adapter `name`'s tensors in PEFT's saved form (`saved_form`), keyed relative to `model` (`state` is
    the model's state dict): from each module that PEFT injected it into (the model itself, the LLM, the tower)."""
    result = {}
    for scope in ("", *SCOPES["both"]):
        target = model if scope == "" else getattr(model, scope)
        if name not in (vars(target).get("peft_config") or {}):
            continue
        prefix = f"{scope}." if scope else ""
        relative = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        result.update({prefix + key: value for key, value in saved_form(target, name, relative).items()})
    return result


def _load_peft_tensors(model: nn.Module, scope: str, name: str, state: dict, source: str) -> None:
    """Put PEFT's saved tensors into the injected layers with PEFT's own loader (`set_peft_model_state_dict`, which
    puts the adapter name back into each key and maps the tensors PEFT saves under other names, such as DoRA's
    magnitude vector). First, every tensor must be one that PEFT saves for these layers (`get_peft_model_state_dict`
    of the fresh layers, which also leaves out what PEFT rebuilds from the config, such as AdaLoRA's `ranknum`):
    none missing, none left over, the same shapes."""
    from peft import set_peft_model_state_dict

    target = model if scope == "" else getattr(model, scope)
    fits = saved_form(target, name, target.state_dict())
    missing = sorted(set(fits) - set(state))
    unexpected = sorted(set(state) - set(fits))
    if missing or unexpected:
        raise PeftOnTopError(
            f"The PEFT adapter '{source}' does not fit this model's {scope or 'modules'}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}. Was it trained on another base model?"
        )
    mis_shaped = [key for key in state if state[key].shape != fits[key].shape]
    if mis_shaped:
        raise PeftOnTopError(
            f"The PEFT adapter '{source}' has tensors of other shapes than this model's layers ({mis_shaped[:3]}): "
            "it was trained on a base model of another size."
        )
    result = set_peft_model_state_dict(target, state, adapter_name=name)
    if result.unexpected_keys:  # the caller removes the half-loaded adapter
        raise PeftOnTopError(
            f"PEFT could not place tensors of the adapter '{source}' in this model's {scope or 'modules'}: "
            f"{sorted(result.unexpected_keys)[:3]}."
        )


def _strip_wrapper_prefix(key: str) -> str:
    # PEFT saves keys relative to the PeftModel: "base_model.model.<module path>".
    return key[len("base_model.model.") :] if key.startswith("base_model.model.") else key


def _peft_folder(name: str, download: dict[str, Any]) -> str:
    """The local folder of a PEFT adapter: `name` itself, or a Hub repo's snapshot (the adapter's files only).
    `download`: transformers' download keywords (revision, token, cache_dir, force_download, local_files_only) and
    `subfolder`, the adapter's folder inside the repo or directory."""
    download = dict(download)
    subfolder = download.pop("subfolder", None) or ""
    if os.path.isdir(name):
        return os.path.join(name, subfolder)
    from huggingface_hub import snapshot_download

    files = [PEFT_CONFIG_NAME, *PEFT_WEIGHTS_NAMES, "config.json"]
    root = snapshot_download(
        name,
        allow_patterns=[f"{subfolder}/{file}" if subfolder else file for file in files],
        **{key: value for key, value in download.items() if value is not None},
    )
    return os.path.join(root, subfolder)


def _read_peft_weights(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = os.path.join(folder, PEFT_WEIGHTS_NAMES[0])
    if os.path.isfile(path):
        return load_file(path)
    path = os.path.join(folder, PEFT_WEIGHTS_NAMES[1])
    if os.path.isfile(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    raise PeftOnTopError(
        f"{folder} has an adapter_config.json but no adapter weights ({PEFT_WEIGHTS_NAMES[0]})."
    )


def adopt_peft_model(peft_model: Any) -> Any:
    """The LaVIN or CROME model inside a `PeftModel` (from `peft.get_peft_model`), with its PEFT layers recorded
    (so `save_pretrained` saves them with our adapters) and our own modules training again (PEFT freezes every
    parameter it did not add). Returns the inner model; the PeftModel keeps working on the same tensors.

    From then on the PeftModel's `save_pretrained` and `push_to_hub` are the inner model's: PEFT's own would write
    the PEFT layers alone and drop our modules, which now train beside them. Its checkpoint holds both and loads
    with `from_pretrained` (not with `PeftModel.from_pretrained`, which finds no adapter_config.json and says so)."""
    if not peft_imported():
        return peft_model
    from peft import PeftModel

    if not isinstance(peft_model, PeftModel):
        return peft_model
    model = peft_model.get_base_model()
    _check_our_model(model)
    for peft_config in peft_model.peft_config.values():
        _check_backbone_weights_stay_frozen(peft_config)
    _record_whole_model_adapters(model, peft_model.peft_config)
    model.restore_trainable_side()
    peft_model.save_pretrained = model.save_pretrained
    peft_model.push_to_hub = model.push_to_hub
    return model


def _record_whole_model_adapters(model: nn.Module, peft_configs: dict[str, Any]) -> None:
    """Record adapters that PEFT injected into the whole model (`get_peft_model`), unless already recorded."""
    recorded = dict(model.config.peft_adapters or {})
    for peft_config in peft_configs.values():
        _check_supported(peft_config)
    if peft_configs:  # one PeftModel holds adapters of one PEFT type: one look at the model's tensors
        check_layers_share_nothing(model, type(next(iter(peft_configs.values()))).__name__)
    for adapter_name, peft_config in peft_configs.items():
        if adapter_name not in recorded:
            recorded[adapter_name] = {"on": "", "config": peft_config_to_dict(peft_config)}
    model.config.peft_adapters = recorded


def sync_record(model: nn.Module) -> None:
    """Make `config.peft_adapters` describe the PEFT layers the model holds (before a save): layers added by
    `peft.get_peft_model` are recorded from the config PEFT left on the model (`model.peft_config`); a recorded
    adapter whose layers are gone (merged or unloaded through PEFT) is dropped from the record; each entry notes
    whether the adapter is active (`"active"`), so that a load makes the same ones active, and its place in the
    injection order (`"order"`)."""
    present = adapter_names_in(model)
    unrecorded = sorted(present - set(model.config.peft_adapters or {}))
    if unrecorded:
        known = getattr(model, "peft_config", None) or {}
        if any(name not in known for name in unrecorded):
            raise PeftOnTopError(
                f"The model holds PEFT layers (adapter(s) {unrecorded}) whose configuration is unknown, so a "
                "saved checkpoint could not rebuild them. Add PEFT layers with mmadapters.add_lora(model, config) "
                "or model.add_adapter(config), or pass the PeftModel through mmadapters.adopt_peft_model first."
            )
        _record_whole_model_adapters(model, {name: known[name] for name in unrecorded})
    gone = [name for name in model.config.peft_adapters or {} if name not in present]
    if gone:
        logger.info(f"PEFT adapter(s) {gone} are no longer in the model's layers; dropped from its config.")
        kept = {k: v for k, v in model.config.peft_adapters.items() if k not in gone}
        model.config.peft_adapters = kept or None
    active = set(model.active_adapters())
    for order, (name, entry) in enumerate((model.config.peft_adapters or {}).items()):
        entry["active"] = name in active
        entry["order"] = order  # the injection order (see in_injection_order)


def peft_layers_state(module: nn.Module) -> tuple[list[torch.Tensor], tuple]:
    """What the PEFT layers inside `module` compute with, for a cache key: their adapters' tensors (not the wrapped
    base weights) and, per layer, the active, disabled and merged adapters and the scalings."""
    tensors, state = [], []
    for name, layer in tuner_layers(module):
        for holder_name in layer.adapter_layer_names:
            tensors.extend(getattr(layer, holder_name).parameters())
        scaling = getattr(layer, "scaling", {})
        state.append(
            (
                name,
                tuple(layer.active_adapters),
                bool(layer.disable_adapters),
                tuple(layer.merged_adapters),
                tuple((adapter, float(value)) for adapter, value in sorted(scaling.items())),
            )
        )
    return tensors, tuple(state)


def merge_peft_layers(module: nn.Module) -> int:
    """Merge every PEFT layer inside `module` into the weight it wraps (its active adapters) and put the plain
    layer back; returns how many were merged. A PEFT method that cannot merge raises PEFT's own error."""
    if not peft_imported():
        return 0
    from peft.utils.other import AuxiliaryTrainingWrapper

    merged = 0
    # PEFT's wrappers around a whole module (LoRA's `trainable_token_indices` on the embeddings) merge and give the
    # plain module back themselves, as in PEFT's merge_and_unload.
    for name, wrapper in [
        (n, m) for n, m in module.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)
    ]:
        parent_name, _, child_name = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child_name, wrapper.unload_and_optionally_merge_module(True, False, None))
        merged += 1
    for name, layer in tuner_layers(module):
        if not hasattr(layer, "get_base_layer"):
            continue
        layer.merge()
        parent_name, _, child_name = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child_name, layer.get_base_layer())
        merged += 1
    return merged


def name_through_peft_layers(model: nn.Module, name: str) -> str:
    """`name` (of a parameter, as transformers' tied-weights mapping gives it) as the model holds it now: a PEFT
    layer or wrapper on the module (LoRA on a tied LM head, trainable tokens on tied embeddings) keeps the module's
    weight under its `base_layer` (or its wrapper's `original_module` / `token_adapter`). A name that leads
    nowhere is returned as it is."""
    module, path = model, []
    for part in name.split("."):
        while part not in module._modules and part not in module._parameters and part not in module._buffers:
            inner = next(
                (
                    n
                    for n in ("base_layer", "original_module", "token_adapter")
                    if module._modules.get(n) is not None
                ),
                None,
            )
            if inner is None:
                return name
            path.append(inner)
            module = module._modules[inner]
        path.append(part)
        if part in module._modules:
            module = module._modules[part]
            if module is None:
                return name
    return ".".join(path)


def _check_our_model(model: nn.Module) -> None:
    if not hasattr(model, "adapter_module_names") or not hasattr(model.config, "peft_adapters"):
        raise PeftOnTopError(
            f"{type(model).__name__} is not a LaVIN or CROME model; use peft.get_peft_model for other models."
        )


__all__ = [
    "PeftOnTopError",
    "add_lora",
    "adopt_peft_model",
    "inject_peft_layers",
    "load_peft_adapter",
    "merge_peft_layers",
    "name_through_peft_layers",
    "peft_state_prefixes",
    "rebuild_recorded_layers",
    "sync_record",
    "tuner_layers",
]
