"""LaVIN: a frozen LLM and a frozen vision tower joined by Mixture-of-Modality adapters (LAVIN.md).

Reading order: `LavinForConditionalGeneration._build_trainable_side` (what is built around the frozen backbones), `forward` (data flow),
`compute_routing_table` (where the LLM-side router is computed), `generate`, then saving and loading.
"""

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Unpack

import torch
from torch import nn
from torch.compiler import is_compiling
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import TransformersKwargs, can_return_tuple

from .. import peft_on_top
from ..adapters import (
    FOLDED_ADAPTERS_KWARG,
    ROUTING_WEIGHTS_KWARG,
    DecoderLayerAdapters,
    FoldedAdapters,
    MMAdapter,
    MMAdapterConfig,
    find_decoder_layers,
    find_vision_layers,
    inject_decoder_adapters,
    inject_vision_adapters,
)
from ..adapters.call_state import recording_routing
from ..adapters.injection import bind_replica_adapters
from ..backbones import BackboneReference
from ..causal_lm_output import VisionLanguageCausalLMOutput, image_features_output
from ..frozen_backbones import (
    CROME_INPUTS,
    FrozenBackbonesPreTrainedModel,
    adapter_settings,
    refuse_other_models_inputs,
)
from ..image_tokens import check_image_token_count, embed_text_tokens, refuse_images_without_pixels
from ..per_layer_embeddings import add_per_layer_inputs, pad_per_layer_inputs, takes_per_layer_inputs
from ..transformers_compat import cache_kwargs, pick_cache
from .configuration_lavin import LavinConfig
from .feature_whitening import VisualFeatureWhitening

# Top-level modules that an adapter-only checkpoint holds (the trainable side, and the fitted feature whitening
# when it is on); everything else is a frozen backbone.
ADAPTER_MODULES = ("llm_adapters", "vision_adapters", "feature_whitening", "projector", "modality_embedding")


@contextmanager
def activation_checkpointing_paused(module: nn.Module) -> Iterator[None]:
    """Run `module` without activation checkpointing (transformers' per-layer `gradient_checkpointing` flags)."""
    layers = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for layer in layers:
        layer.gradient_checkpointing = False
    try:
        yield
    finally:
        for layer in layers:
            layer.gradient_checkpointing = True


def _drop_first_image(outputs: BaseModelOutputWithPooling) -> BaseModelOutputWithPooling:
    """The vision outputs without their first image (every tensor field, and tuples of them, sliced)."""
    for key, value in outputs.items():
        if isinstance(value, torch.Tensor):
            outputs[key] = value[1:]
        elif isinstance(value, tuple):
            outputs[key] = tuple(item[1:] for item in value)
    return outputs


class LavinProjector(nn.Module):
    """LaVIN's "visual adapter": Linear(vision width -> 128) -> SiLU -> Linear(128 -> LLM width)."""

    def __init__(self, vision_hidden_size: int, hidden_size: int, text_hidden_size: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden_size, hidden_size)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(hidden_size, text_hidden_size)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for linear in (self.linear_1, self.linear_2):
            init.xavier_uniform_(linear.weight)
            init.zeros_(linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class LavinPreTrainedModel(FrozenBackbonesPreTrainedModel):
    config: LavinConfig

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Runs for modules a checkpoint did not provide (see FrozenBackbonesPreTrainedModel); our adapters,
        # projector and whitening reset themselves there.
        if module is getattr(self, "modality_embedding", None):
            init.normal_(module.weight, mean=0.0, std=1.0)  # N(0, 1), as in the official code
        else:
            super()._init_weights(module)

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func: Any = None, **kwargs: Any
    ):
        # The LLM routing weights reach the decoder layers as keyword arguments, which reentrant checkpointing
        # does not differentiate: the routers and the modality embedding would silently get no gradient.
        if enable and getattr(gradient_checkpointing_func, "keywords", {}).get("use_reentrant"):
            raise ValueError(
                "LaVIN does not support reentrant activation checkpointing (use_reentrant=True): its routing weights "
                "reach the decoder layers as keyword arguments, which reentrant checkpointing does not "
                "differentiate, so the routers would get no gradient. Use use_reentrant=False (transformers' "
                "default; `gradient_checkpointing_kwargs={'use_reentrant': False}` in TrainingArguments)."
            )
        if gradient_checkpointing_func is not None:
            kwargs["gradient_checkpointing_func"] = gradient_checkpointing_func
        super()._set_gradient_checkpointing(enable=enable, **kwargs)


class LavinForConditionalGeneration(LavinPreTrainedModel, GenerationMixin):
    """LaVIN: MM-Adapters inside a frozen LLM and a frozen CLIP/SigLIP vision tower, routed by modality.

    Build it around any Hub backbones with [`~LavinForConditionalGeneration.from_backbones`]; only the adapter
    side trains (LLM and vision adapters with their routers, the projector, the modality embedding).
    """

    def _build_trainable_side(self, config: LavinConfig) -> None:
        """The adapters, the projector and the modality embedding, around the frozen backbones (the base's
        `__init__` builds or takes those and freezes them, then calls this)."""
        adapter_config = config.mm_adapter_config
        text_width = config.text_config.hidden_size
        vision_width = config.vision_config.hidden_size

        # LLM side: one adapter per decoder layer (two with placement="attn_mlp"), routed by modality.
        decoder_layers = find_decoder_layers(self.language_model, need_mlp=adapter_config.sites_per_layer > 1)
        self.llm_adapters = nn.ModuleList(
            DecoderLayerAdapters(text_width, adapter_config, index) for index in range(len(decoder_layers))
        )
        # The hooks' handles, kept for remove_adapter_hooks (a plain list: not part of the state dict).
        self._adapter_hook_handles = inject_decoder_adapters(decoder_layers, self.llm_adapters)
        self._adapters_attached = True  # read by the forward (torch.compile cannot read hook handles)

        # Vision side: one adapter per encoder layer, each image routed by its own CLS (or mean) token.
        self.vision_adapters = None
        if adapter_config.vision_adapters:
            vision_layers = find_vision_layers(self.vision_tower)
            router_token = "first" if config.vision_feature_pooling == "cls" else "mean"
            self.vision_adapters = nn.ModuleList(
                MMAdapter(vision_width, adapter_config, router_token, adapter_config.official_vision_routing)
                for _ in vision_layers
            )
            self._adapter_hook_handles += inject_vision_adapters(vision_layers, self.vision_adapters)

        # Off by default (not in the paper): a fixed whitening of the visual features, for random towers.
        self.feature_whitening = (
            VisualFeatureWhitening(config.num_image_tokens, vision_width)
            if config.vision_feature_whitening
            else None
        )
        self.projector = LavinProjector(vision_width, config.projector_hidden_size, text_width)
        # Index 1: the sample has an image; 0: text only. Its trajectory through the LLM sets the routing.
        self.modality_embedding = nn.Embedding(2, text_width)
        self._fold_cache: tuple[tuple, FoldedAdapters] | None = None  # see fold_llm_adapters
        self._fold_directions: dict[tuple[int, torch.device], torch.Tensor] = {}  # see _fold_key
        # A plain attribute (not `config.mm_adapter_config`, which builds a dataclass: a torch.compile graph break).
        self.llm_routing = adapter_config.llm_routing

    # ------------------------------------------------------------------------------------------------
    # Construction around Hub backbones
    # ------------------------------------------------------------------------------------------------

    @classmethod
    def _composite_config(
        cls,
        text_ref: BackboneReference | None,
        adapter_config: MMAdapterConfig | None,
        fields: dict[str, Any],
        hub_kwargs: dict[str, Any] | None = None,
    ) -> LavinConfig:
        return LavinConfig(
            adapter_config=adapter_settings(adapter_config, MMAdapterConfig, text_ref), **fields
        )

    def _position_offset(self) -> int:
        return 1  # position 0 belongs to the modality token

    def remove_adapter_hooks(self) -> None:
        """Detach the adapters from the backbones (the LLM and the tower then compute as without LaVIN); the
        adapter modules stay. Used by the merged export, which folds the LLM adapters into the weights."""
        for handle in self._adapter_hook_handles:
            handle.remove()
        self._adapter_hook_handles = []
        self._adapters_attached = False

    def check_adapters_attached(self) -> None:
        """Refuse to run, route or merge a LaVIN whose adapters were detached (`remove_adapter_hooks`, or
        `merge_lavin_adapters`, which consumes the model): it would compute without them, or fold them twice."""
        if not self._adapters_attached:
            raise RuntimeError(
                "This LaVIN's adapters are detached from its backbones (remove_adapter_hooks(), which "
                "merge_lavin_adapters and `mmadapters merge` call after folding them into the LLM): running, routing "
                "or merging it again would compute without its adapters or fold them in twice. Load the checkpoint "
                "again with from_pretrained."
            )

    def own_layer_adapters(self) -> list[tuple[nn.Module, nn.Module]]:
        """Each LLM adapter with its decoder layer, each vision adapter with its encoder layer."""
        pairs = list(zip(self.llm_adapters, find_decoder_layers(self.language_model), strict=True))
        if self.vision_adapters is not None:
            pairs += list(zip(self.vision_adapters, find_vision_layers(self.vision_tower), strict=True))
        return pairs

    # ------------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------------

    def embed_tokens(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Token embeddings; image placeholders (possibly past the vocabulary) get a dummy id, replaced later."""
        return embed_text_tokens(self.get_input_embeddings(), input_ids, self.config.image_token_id)

    def get_image_features(
        self, pixel_values: torch.Tensor, return_dict: bool | None = None, **kwargs: Any
    ) -> BaseModelOutputWithPooling | tuple:
        """The visual tokens, as transformers' vision-language models return them: a `BaseModelOutputWithPooling`
        whose `pooler_output` holds the visual tokens (num_images, num_image_tokens, LLM width) and whose other
        fields are the vision tower's (`last_hidden_state`, `hidden_states`, `attentions` with
        `output_attentions=True`); a tuple with `return_dict=False` (default: `config.return_dict`).

        The visual tokens: the CLS token after every k-th vision layer (taken from the hidden states, before any
        post-layernorm), whitened if that is on, through the projector. `image_tokens(pixel_values)` returns
        the tensor alone."""
        if self.feature_whitening is None:
            features, vision_outputs = self._pooled_vision_features(pixel_values, **kwargs)
        else:
            # The whitening scales the features' low-variance directions up by as much as 1e3: bfloat16 rounding of
            # the tower's output would be amplified into noise. So under autocast (mixed-precision training) the
            # tower and the whitening keep their own precision (float32 for the embedded tower).
            with torch.autocast(device_type=pixel_values.device.type, enabled=False):
                features, vision_outputs = self._pooled_vision_features(pixel_values, **kwargs)
                features = self.feature_whitening(features)
        projector_weight = self.projector.linear_1.weight
        tokens = self.projector(features.to(projector_weight.device, projector_weight.dtype))
        output = image_features_output(tokens, vision_outputs)
        return output if self._return_dict(return_dict) else output.to_tuple()

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The visual tokens alone: `get_image_features(pixel_values).pooler_output`."""
        return self.get_image_features(pixel_values, return_dict=True).pooler_output

    def pooled_vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision tower's features that LaVIN reads: (num_images, num_feature_layers, vision width)."""
        return self._pooled_vision_features(pixel_values)[0]

    def _pooled_vision_features(self, pixel_values: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        # every path to the tower (features, whitening fit) comes here
        self.check_pixel_values(pixel_values, kwargs.get("interpolate_pos_encoding", False))
        kwargs.pop("output_hidden_states", None)  # always on: the features are read from the hidden states
        # The tower casts the pixels to its patch embedding's dtype itself (as transformers' LLaVA relies on).
        outputs = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True, **kwargs)
        hidden_states = outputs.hidden_states  # (embeddings, layer 1, ..., layer N)
        if self.config.vision_feature_pooling == "cls":
            self.check_cls_token(hidden_states[0].shape[1], pixel_values)
            pooled = [hidden_states[layer][:, 0] for layer in self.config.vision_feature_layers]
        else:
            pooled = [hidden_states[layer].mean(dim=1) for layer in self.config.vision_feature_layers]
        return torch.stack(pooled, dim=1), outputs

    def check_cls_token(self, num_tokens: int, pixel_values: torch.Tensor) -> None:
        """Refuse "cls" pooling on a tower whose output has no token before the patches (a layout the table in
        `vision_layout` does not know): its first token is a patch, which the features and the vision adapters'
        routing would silently read. Counted from the pixels, so towers that interpolate to other sizes pass."""
        patch_size = getattr(self.config.vision_config, "patch_size", None)
        if is_compiling() or not isinstance(patch_size, int):
            return
        num_patches = (pixel_values.shape[-2] // patch_size) * (pixel_values.shape[-1] // patch_size)
        if num_tokens <= num_patches:
            raise ValueError(
                f"vision_feature_pooling='cls' reads each image's first token, but the vision tower "
                f"({self.config.vision_config.model_type}) returned {num_tokens} tokens for {num_patches} patches: it "
                "has no CLS token, so the first is a patch. Build LaVIN with vision_feature_pooling='mean'."
            )

    @torch.no_grad()
    def fit_feature_whitening(
        self, pixel_values: torch.Tensor | Iterable[torch.Tensor], min_relative_variance: float = 1e-6
    ) -> None:
        """Fit the visual feature whitening (`vision_feature_whitening=True`) to the tower's features of these
        unlabeled images: a tensor of pixel values, or an iterable of batches of them (more images than the
        vision width; a few thousand is typical). Call it once, before training: the vision adapters as they
        are then (identity at initialisation) shape the features it sees."""
        if self.feature_whitening is None:
            raise ValueError(
                "This LaVIN was built without feature whitening: build it with "
                "`from_backbones(..., vision_feature_whitening=True)` to use it."
            )
        batches = [pixel_values] if isinstance(pixel_values, torch.Tensor) else pixel_values
        device = self.vision_tower.device
        features = torch.cat([self.pooled_vision_features(batch.to(device)).float() for batch in batches])
        self.feature_whitening.fit(features, min_relative_variance)

    def restore_trainable_side(self) -> None:
        super().restore_trainable_side()
        self._freeze_unused_llm_routing()

    def _freeze_unused_llm_routing(self) -> None:
        # llm_routing="modality" (ours) fixes the LLM-side routing: those routers and the modality embedding,
        # which only feeds them, are not used and do not train.
        if self.llm_routing == "modality":
            for layer in self.llm_adapters:
                for adapter in layer.sites():
                    adapter.router.requires_grad_(False)
            self.modality_embedding.requires_grad_(False)

    def compute_routing_table(self) -> torch.Tensor:
        """The LLM-side routing weights for both modalities: (2 modalities, layers, sites, 2 experts).

        With `llm_routing="modality"` (ours) the table is fixed: text-only sequences (row 0) use expert D alone,
        sequences with an image (row 1) expert B alone.

        Officially the modality token is prepended at position 0, attends only to itself and nothing attends
        to it, and in every layer the router reads that token's normed hidden state. Its trajectory therefore
        depends only on the modality bit, so it is run here once, alone, as a length-1 sequence at position 0,
        with every adapter routing itself by it; the weights each adapter computed form the table.
        """
        self.check_adapters_attached()
        num_layers, sites = len(self.llm_adapters), len(self.llm_adapters[0].sites())
        if self.llm_routing == "modality":
            weight = self.modality_embedding.weight
            table = torch.zeros(2, num_layers, sites, 2, device=weight.device, dtype=weight.dtype)
            table[0, ..., 1] = 1.0  # text only: expert D
            table[1, ..., 0] = 1.0  # with an image: expert B
            return table
        adapters = [adapter for layer in self.llm_adapters for adapter in layer.sites()]
        decoder = self.language_model.get_decoder()
        tokens = self.modality_embedding.weight.unsqueeze(1).to(self.get_input_embeddings().weight.dtype)
        position_ids = torch.zeros(2, 1, dtype=torch.long, device=tokens.device)
        # Every adapter routes itself by the modality token; the weights are collected per thread (call_state).
        # One token per modality: never worth checkpointing (a recomputation would also re-run this pass).
        # An LLM with per-layer token embeddings (Gemma 3n / 4) reads the pad token's for the modality token.
        token_inputs = (
            {"per_layer_inputs": pad_per_layer_inputs(self.language_model, 2, 1, tokens.device)}
            if takes_per_layer_inputs(self.language_model)
            else {}
        )
        with recording_routing() as recorded, activation_checkpointing_paused(decoder):
            decoder(inputs_embeds=tokens, position_ids=position_ids, use_cache=False, **token_inputs)
        # Adapters may sit on several devices (a split device map): gather the weights where the tokens are.
        weights = torch.stack([recorded[id(adapter)].to(tokens.device) for adapter in adapters], dim=1)
        return weights.view(2, num_layers, sites, 2)

    def fold_llm_adapters(self) -> FoldedAdapters:
        """The LLM adapters folded per modality (for inference): each is then x + U (A x + b_A) + c.

        `generate` folds once per call, which makes the per-token adapter cost a few small ops (see
        benchmarks/generation_speed.py). Without gradients the fold is also kept across calls, keyed on the
        adapters' values (`_fold_key`), not on version counters: fused optimizers update parameters without
        bumping those, and a cache keyed on them once served stale adapters after training.
        """
        cacheable = not torch.is_grad_enabled()
        key = self._fold_key() if cacheable else None
        if cacheable and self._fold_cache is not None and self._fold_cache[0] == key:
            return self._fold_cache[1]
        table = self.compute_routing_table()  # (2, layers, sites, 2)
        folded = [
            layer.fold(table[:, index].to(layer.attn.down.weight.device))
            for index, layer in enumerate(self.llm_adapters)
        ]
        # Gathered on one device (the table's) even when the adapters sit on several; each layer's hook moves its
        # rows back to its layer's device (a no-op on a single device).
        result = FoldedAdapters(
            torch.stack([up.to(table.device) for up, _ in folded]),
            torch.stack([bias.to(table.device) for _, bias in folded]),
        )
        self._fold_cache = (key, result) if cacheable else None
        return result

    def _fold_key(self) -> tuple:
        """A cheap identity of what the fold depends on: the values of the LLM adapters and the modality embedding
        and, with learned routing (the routing table runs the modality token through the LLM and our routers), of
        the PEFT layers there with their state (active, disabled and merged adapters, scalings): a LoRA switched,
        hotswapped or trained changes the table. Values count by their sum of absolute values and their
        projection on a fixed random direction (a collision would need an update orthogonal to a random vector
        that also keeps the L1 norm), per device (a device map may split them); about a millisecond for
        LaVIN-7B's 2.6M LLM-side values."""
        tensors = [*self.llm_adapters.parameters(), self.modality_embedding.weight]
        peft_state: tuple = ()
        if self.llm_routing == "learned":
            # PEFT layers on our routers (their tensors are among the adapters' parameters) and in the LLM
            _, on_routers = peft_on_top.peft_layers_state(self.llm_adapters)
            llm_tensors, in_llm = peft_on_top.peft_layers_state(self.language_model)
            tensors += llm_tensors
            peft_state = (on_routers, in_llm)
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for tensor in tensors:
            by_device.setdefault(tensor.device, []).append(tensor.detach().reshape(-1).double())
        key: list = [peft_state, tuple(sorted({str(tensor.dtype) for tensor in tensors}))]
        for device, parts in by_device.items():
            values = torch.cat(parts)
            direction = self._fold_directions.get((len(values), device))
            if direction is None:
                generator = torch.Generator().manual_seed(0)
                direction = torch.rand(len(values), generator=generator, dtype=torch.float64).to(device)
                self._fold_directions[(len(values), device)] = direction
            key.append((str(device), float(values @ direction), float(values.abs().sum())))
        return tuple(key)

    def check_routing_inputs(
        self, modality: torch.Tensor | None, routing_weights: torch.Tensor | None, batch: int
    ) -> torch.LongTensor | None:
        """Refuse a `modality` or `routing_weights` that cannot route this batch, naming the argument (before: a
        size mismatch or an IndexError inside the adapters). Returns `modality` as integers: a boolean one would
        index the routing table as a mask (picking rows) rather than by 0/1. Skipped while torch.compile traces."""
        if modality is not None and modality.dtype == torch.bool:
            modality = modality.long()
        if is_compiling():
            return modality
        if modality is not None:
            if modality.dtype.is_floating_point or modality.is_complex():
                raise ValueError(
                    f"modality must hold integers (1 = image sample, 0 = text only), got dtype {modality.dtype}."
                )
            if tuple(modality.shape) != (batch,):
                raise ValueError(
                    f"modality has shape {tuple(modality.shape)} but must be ({batch},): one entry per sample. "
                    "Leave it out to have it read from the image tokens in input_ids."
                )
            if ((modality != 0) & (modality != 1)).any():
                raise ValueError(
                    f"modality must be 0 (text only) or 1 (image sample) for each sample, got {modality.tolist()}."
                )
        if routing_weights is not None:
            expected = (batch, len(self.llm_adapters), len(self.llm_adapters[0].sites()), 2)
            if tuple(routing_weights.shape) != expected:
                raise ValueError(
                    f"routing_weights has shape {tuple(routing_weights.shape)} but must be {expected} (batch, "
                    "LLM layers, adapter sites, experts). Leave it out to have it computed from modality."
                )
        return modality

    def modality_of(self, input_ids: torch.LongTensor) -> torch.LongTensor:
        """1 for each sequence that holds image placeholder tokens, else 0."""
        return (input_ids == self.config.image_token_id).any(dim=-1).long()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        modality: torch.LongTensor | None = None,
        routing_weights: torch.Tensor | None = None,
        folded_adapters: FoldedAdapters | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        supervised_logits_only: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> VisionLanguageCausalLMOutput | tuple:
        r"""
        cache: the KV cache (transformers 5.24 calls it `cache`; earlier releases `past_key_values`, which is
            accepted as a keyword too).
        modality: (batch,) 1 = image sample, 0 = text only. Default: read from the image tokens in `input_ids`.
        routing_weights: (batch, layers, sites, 2) precomputed LLM routing weights (`generate` passes them so
            that the routing table is computed once per call). Default: computed here from `modality`.
        folded_adapters: the output of `fold_llm_adapters` (inference only; `generate` passes it in eval mode).
        position_ids: positions of the text tokens counted from 0; the LLM sees them shifted by one, because
            position 0 belongs to the (virtual) modality token, as in training of the official model.
        supervised_logits_only: with `labels`, compute logits only where the next token is supervised (same
            loss, a fraction of the LM-head cost; `logits` then holds those positions only). Our Trainers set it.
        shift_labels (keyword): labels already shifted (context-parallel training); used instead of `labels`.
        use_cache, return_dict, output_attentions, ... (keywords): as in transformers' models (LLaVA's forward
            takes them the same way: `use_cache` goes to the LLM, `return_dict=False` returns a tuple).
        """
        cache = pick_cache(cache, kwargs.pop("past_key_values", None), type(self).__name__)
        refuse_other_models_inputs(type(self).__name__, kwargs, CROME_INPUTS)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        self.check_adapters_attached()
        # torch marks the copies nn.DataParallel makes; their hooks must run their own adapters (data_parallel.py).
        if getattr(self, "_is_replica", False):
            bind_replica_adapters(self.own_layer_adapters())
        self.check_inputs(
            input_ids,
            attention_mask,
            pixel_values,
            cache.get_seq_length() if cache else 0,
            position_ids=position_ids,
        )
        batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        modality = self.check_routing_inputs(modality, routing_weights, batch)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        prefill = cache is None or cache.get_seq_length() == 0

        image_mask = self.placeholder_mask(input_ids, inputs_embeds, pixel_values)
        image_outputs = None
        if pixel_values is not None:
            inputs_embeds, image_outputs = self._place_image_features(
                image_mask, pixel_values, inputs_embeds, output_attentions=kwargs.get("output_attentions")
            )
        elif prefill:
            refuse_images_without_pixels(image_mask)

        if modality is None and (routing_weights is None or folded_adapters is not None):
            modality = image_mask.any(dim=-1).long()
        if folded_adapters is not None:
            adapter_kwargs = {FOLDED_ADAPTERS_KWARG: folded_adapters.rows(modality)}
        else:
            if routing_weights is None:
                table = self.compute_routing_table()
                routing_weights = table[modality.to(table.device)]
            adapter_kwargs = {ROUTING_WEIGHTS_KWARG: routing_weights}

        if position_ids is None:
            position_ids = self._text_position_ids(inputs_embeds, attention_mask, cache)
        add_per_layer_inputs(self.language_model, kwargs, input_ids, image_mask)
        llm_kwargs = dict(
            attention_mask=attention_mask,
            position_ids=position_ids + 1,  # position 0 belongs to the modality token
            **cache_kwargs(cache),
            **adapter_kwargs,
            **kwargs,  # use_cache, output_attentions, the loss keywords (causal_lm_output takes those out), ...
        )
        return self._decoder_only_output(
            inputs_embeds, image_outputs, labels, logits_to_keep, supervised_logits_only, llm_kwargs
        )

    def _place_image_features(
        self,
        image_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        inputs_embeds: torch.Tensor,
        output_attentions: bool | None = None,
    ) -> tuple[torch.Tensor, BaseModelOutputWithPooling]:
        check_image_token_count(
            image_mask, pixel_values.shape[0], self.config.num_image_tokens, "LavinProcessor"
        )
        vision_kwargs = {"output_attentions": True} if output_attentions else {}
        # Official routing (converted checkpoints) routes every image by batch item 0's image; the official
        # evaluation gives a text-only item an all-zero image, so a batch that starts with a text-only sample is
        # routed by a zero image: prepended here, run through the tower, and dropped again.
        official = bool(
            self.config.adapter_config.get("official_vision_routing")
        )  # a constant under torch.compile
        zero_first = official and not bool(image_mask[0].any())
        if zero_first:
            pixel_values = torch.cat([torch.zeros_like(pixel_values[:1]), pixel_values])
        image_outputs = self.get_image_features(pixel_values, return_dict=True, **vision_kwargs)
        if zero_first:
            image_outputs = _drop_first_image(image_outputs)
        placed = image_outputs.pooler_output.to(inputs_embeds.device, inputs_embeds.dtype)
        mask = image_mask.to(inputs_embeds.device).unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, placed), image_outputs

    @staticmethod
    def _text_position_ids(
        inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache: Any
    ) -> torch.LongTensor:
        """Positions as `generate` computes them: left padding does not shift the real tokens."""
        seq_len = inputs_embeds.shape[1]
        if attention_mask is not None and attention_mask.dim() == 2:
            positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
            return positions[:, -seq_len:].to(inputs_embeds.device)
        past = cache.get_seq_length() if cache is not None else 0
        return torch.arange(past, past + seq_len, device=inputs_embeds.device).unsqueeze(0)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        modality: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """`GenerationMixin.generate`, with the LLM routing computed once per call (not per token).

        In eval mode the LLM adapters are also folded once per call into their affine form (`fold_llm_adapters`),
        so that each generated token pays three small ops per adapter. The vision tower runs once, in the
        prefill step (`generate` drops `pixel_values` afterwards).
        """
        self.check_assistant_model(kwargs.get("assistant_model"))
        if modality is None:
            if input_ids is None:
                raise ValueError("generate needs input_ids, or `modality` with inputs_embeds.")
            modality = self.modality_of(input_ids)
        else:
            source = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
            batch = source.shape[0] if source is not None else modality.shape[0]
            modality = self.check_routing_inputs(modality, None, batch)
        if not self.training and "routing_weights" not in kwargs:
            kwargs["folded_adapters"] = self.fold_llm_adapters()
        elif "routing_weights" not in kwargs:
            kwargs["routing_weights"] = self.compute_routing_table()[modality]
        return super().generate(input_ids=input_ids, pixel_values=pixel_values, modality=modality, **kwargs)

    # ------------------------------------------------------------------------------------------------
    # Adapter-only checkpoints
    # ------------------------------------------------------------------------------------------------

    def adapter_module_names(self) -> tuple[str, ...]:
        """What an adapter-only checkpoint holds: LLM and vision adapters, projector, modality embedding."""
        return ADAPTER_MODULES


__all__ = [
    "LavinForConditionalGeneration",
    "LavinPreTrainedModel",
    "LavinProjector",
]
