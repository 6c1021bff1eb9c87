"""CROME: instruction-aware Q-Former + cross-modal adapter in front of a frozen LLM (CROME.md).

Reading order: `_build_trainable_side` (what is built), `get_image_features` (vision -> Q-Former -> projections),
`embed_inputs` (where the adapter's two branches apply), `forward`, `generate`, `set_stage`.
"""

from typing import Any, Unpack

import torch
from torch import nn
from torch.compiler import is_compiling
from transformers import GenerationMixin, InstructBlipQFormerModel
from transformers import initialization as init
from transformers.loss.loss_utils import fixed_cross_entropy
from transformers.modeling_outputs import Seq2SeqLMOutput
from transformers.utils import TransformersKwargs, can_return_tuple

from ..adapters import CromeAdapter, CromeAdapterConfig
from ..backbones import (
    BackboneMismatchError,
    BackboneReference,
    BackboneSpec,
    fingerprint,
    fingerprints_match,
    read_tensors,
    resolve_checkpoint_folder,
    tokenizer_for,
)
from ..causal_lm_output import (
    LOSS_KWARGS,
    VisionLanguageCausalLMOutput,
    image_features_output,
)
from ..frozen_backbones import (
    LAVIN_INPUTS,
    FrozenBackbonesPreTrainedModel,
    adapter_settings,
    check_token_ids,
    refuse_other_models_inputs,
)
from ..image_tokens import (
    check_image_token_count,
    embed_text_tokens,
    refuse_images_without_pixels,
    vocabulary_size,
)
from ..per_layer_embeddings import add_per_layer_inputs
from ..transformers_compat import cache_kwargs, cache_of, pick_cache
from ..vision_layout import square_side
from .configuration_crome import STAGES, CromeConfig

# What trains in each stage (CROME.md section 3); everything else is frozen.
STAGE_MODULES = {
    "pretrain": ("query_projection", "patch_projection", "adapter"),
    "instruct": ("qformer", "query_tokens", "query_projection", "patch_projection", "adapter"),
    "finetune": ("adapter",),
}
# Modules an InstructBLIP checkpoint can provide (see convert/instructblip.py).
SOURCEABLE_MODULES = ("qformer", "query_tokens", "query_projection")
INSTRUCTBLIP_PREFIXES = ("qformer.", "query_tokens", "language_projection.")


def refuse_encoder_decoder_options(
    decoder_input_ids: torch.Tensor | None, decoder_attention_mask: torch.Tensor | None
) -> None:
    """A decoder-only LLM reads its whole sequence from input_ids: the decoder inputs are refused, not dropped."""
    given = [
        name
        for name, value in (
            ("decoder_input_ids", decoder_input_ids),
            ("decoder_attention_mask", decoder_attention_mask),
        )
        if value is not None
    ]
    if given:
        raise ValueError(
            f"{', '.join(given)} apply to an encoder-decoder LLM (T5); this CROME's LLM is decoder-only: put the "
            "whole sequence (prompt and answer) in input_ids, with labels for the answer, as the processor builds "
            "them. Leave them out."
        )


def check_decoder_input_ids(decoder_input_ids: torch.Tensor | None, batch: int) -> None:
    """An encoder-decoder LLM's decoder input, named when it cannot be one (before: a size mismatch inside T5)."""
    if decoder_input_ids is None or is_compiling():
        return
    if (
        decoder_input_ids.dtype.is_floating_point
        or decoder_input_ids.dim() != 2
        or len(decoder_input_ids) != batch
    ):
        raise ValueError(
            f"decoder_input_ids has shape {tuple(decoder_input_ids.shape)} and dtype {decoder_input_ids.dtype} but "
            f"must be ({batch}, answer length) integer token ids: the decoder's input for each sample."
        )


def refuse_decoder_only_options(
    position_ids: torch.Tensor | None, logits_to_keep: int | torch.Tensor, kwargs: dict[str, Any]
) -> None:
    """An encoder-decoder LLM (T5) has no use for the decoder-only LLM's options: refused, not dropped."""
    given = ["shift_labels"] if kwargs.get("shift_labels") is not None else []
    if position_ids is not None:
        given.append("position_ids")
    if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        given.append("logits_to_keep")
    if given:
        raise ValueError(
            f"{', '.join(given)} apply to a decoder-only LLM; this CROME's LLM is an encoder-decoder (T5), which "
            "places tokens by relative position, scores `labels` (the answer) and returns the logits of every "
            "decoder position. Leave them out."
        )


class CromePreTrainedModel(FrozenBackbonesPreTrainedModel):
    config: CromeConfig
    # The Q-Former reads its sample's instruction once per image.
    per_image_input_names = ("pixel_values", "qformer_input_ids", "qformer_attention_mask")

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Runs for modules a checkpoint did not provide (see FrozenBackbonesPreTrainedModel).
        if isinstance(module, CromeForConditionalGeneration):  # BLIP-2's query initialisation
            init.normal_(module.query_tokens, mean=0.0, std=module.config.qformer_config.initializer_range)
        else:
            super()._init_weights(module)


class CromeForConditionalGeneration(CromePreTrainedModel, GenerationMixin):
    """CROME around a frozen vision tower and a frozen LLM (decoder-only or encoder-decoder).

    image -> vision tower -> Q-Former (queries + instruction) -> query projection (+ projected patches)
    -> CROME-Adapter, vision branch ; prompt embeddings -> CROME-Adapter, text branch ; concatenated -> LLM.
    """

    def _build_trainable_side(self, config: CromeConfig) -> None:
        """The Q-Former, its query tokens, the projections and the CROME-Adapter (the base's `__init__` builds or
        takes the backbones and freezes them, then calls this; afterwards only the current stage's modules train)."""
        text_width = config.text_config.hidden_size if hasattr(config.text_config, "hidden_size") else None
        text_width = text_width or config.text_config.d_model  # T5 names it d_model
        query_width = config.qformer_config.hidden_size
        self.qformer = InstructBlipQFormerModel(config.qformer_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, query_width))
        self.query_projection = nn.Linear(query_width, text_width)
        self.patch_projection = (
            nn.Linear(config.vision_config.hidden_size, text_width) if config.use_patch_branch else None
        )
        self.adapter = CromeAdapter(text_width, config.crome_adapter_config)

    # ------------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------------

    @classmethod
    def from_backbones(
        cls,
        text_model: BackboneSpec,
        vision_model: BackboneSpec,
        qformer: Any = None,
        adapter_config: CromeAdapterConfig | None = None,
        **kwargs: Any,
    ) -> "CromeForConditionalGeneration":
        """Build CROME around a frozen LLM (decoder-only or T5-style) and a frozen vision tower: the arguments of
        `FrozenBackbonesPreTrainedModel.from_backbones`, and `qformer`, an `InstructBlipQFormerConfig` (default:
        InstructBLIP's shapes reading this tower's width). To start from a trained InstructBLIP Q-Former, use
        `mmadapters.convert.from_instructblip`.
        """
        return super().from_backbones(
            text_model, vision_model, adapter_config, qformer_config=qformer, **kwargs
        )

    @classmethod
    def _composite_config(
        cls,
        text_ref: BackboneReference | None,
        adapter_config: CromeAdapterConfig | None,
        fields: dict[str, Any],
        hub_kwargs: dict[str, Any] | None = None,
    ) -> CromeConfig:
        from transformers import InstructBlipQFormerConfig

        if fields.get("qformer_config") is None:
            # A fresh Q-Former reads the instruction with the LLM's tokenizer [ours] (InstructBLIP's uses BERT's:
            # `convert.from_instructblip` brings it along).
            vocab_size = (
                len(tokenizer_for(text_ref.name_or_path, text_ref.revision, **(hub_kwargs or {})))
                if text_ref
                else 30522
            )
            fields["qformer_config"] = InstructBlipQFormerConfig(
                encoder_hidden_size=fields["vision_config"].hidden_size, vocab_size=vocab_size
            )
        return CromeConfig(
            adapter_config=adapter_settings(adapter_config, CromeAdapterConfig, text_ref), **fields
        )

    @property
    def is_encoder_decoder_llm(self) -> bool:
        return bool(getattr(self.config.text_config, "is_encoder_decoder", False))

    # ------------------------------------------------------------------------------------------------
    # Stages: what trains
    # ------------------------------------------------------------------------------------------------

    def set_stage(self, stage: str) -> dict[str, int]:
        """Make exactly the modules of `stage` trainable (CROME.md section 3) and return a per-module report
        {module: trainable parameters}. The stage is recorded in `config.stages_used`."""
        if stage not in STAGES:
            raise ValueError(f"Unknown stage {stage!r}; stages are {STAGES}.")
        trainable = STAGE_MODULES[stage]
        report = {}
        for name in (
            "vision_tower",
            "qformer",
            "query_tokens",
            "query_projection",
            "patch_projection",
            "adapter",
            "language_model",
        ):
            module = getattr(self, name)
            if module is None:
                continue
            parameters = [module] if isinstance(module, nn.Parameter) else list(module.parameters())
            for parameter in parameters:
                parameter.requires_grad_(name in trainable)
            report[name] = sum(p.numel() for p in parameters) if name in trainable else 0
        if stage not in self.config.stages_used:
            self.config.stages_used.append(stage)
        self._thaw_peft_layers()  # PEFT layers on the backbones (LoRA on top) train in every stage
        return report

    def restore_trainable_side(self) -> None:
        """Make the last stage's modules trainable again (after something froze them, e.g. get_peft_model)."""
        self.set_stage(self.config.stages_used[-1] if self.config.stages_used else "finetune")

    def adapter_module_names(self) -> tuple[str, ...]:
        """What an adapter-only checkpoint holds: everything any stage used so far trained, plus what no
        referenced checkpoint can reproduce (modules not taken from `config.qformer_source`, e.g. the patch
        projection, which InstructBLIP does not have)."""
        names = {name for stage in self.config.stages_used for name in STAGE_MODULES[stage]}
        sourced = set((self.config.qformer_source or {}).get("modules", ()))
        names |= {name for name in SOURCEABLE_MODULES if name not in sourced}
        if self.patch_projection is not None:
            names.add("patch_projection")
        names.add("adapter")
        return tuple(sorted(names))

    def load_instructblip_weights(
        self, folder: str, modules: tuple[str, ...] = SOURCEABLE_MODULES
    ) -> list[str]:
        """Copy an InstructBLIP checkpoint's Q-Former, query tokens and (when the shapes match) language
        projection into this model, reading only those tensors. Returns the modules taken."""
        tensors = read_tensors(folder, INSTRUCTBLIP_PREFIXES)
        taken = []
        with torch.no_grad():
            if "qformer" in modules:
                qformer = {
                    k.removeprefix("qformer."): v for k, v in tensors.items() if k.startswith("qformer.")
                }
                self.qformer.load_state_dict(qformer, strict=True)
                taken.append("qformer")
            if "query_tokens" in modules:
                self.query_tokens.copy_(tensors["query_tokens"])
                taken.append("query_tokens")
            projection = tensors.get("language_projection.weight")
            if "query_projection" in modules and projection is not None:
                if projection.shape == self.query_projection.weight.shape:
                    self.query_projection.weight.copy_(projection)
                    self.query_projection.bias.copy_(tensors["language_projection.bias"])
                    taken.append("query_projection")
        return taken

    def load_referenced_weights(
        self, checkpoint: str, ignore_backbone_mismatch: bool, hub_kwargs: dict[str, Any] | None = None
    ) -> None:
        """Modules initialised from InstructBLIP and never trained are not stored in adapter-only checkpoints:
        read them again from the InstructBLIP checkpoint named in `config.qformer_source`."""
        source = self.config.qformer_source
        if not source:
            return
        folder = resolve_checkpoint_folder(
            source["name_or_path"], source.get("revision"), **(hub_kwargs or {})
        )
        self.load_instructblip_weights(folder, tuple(source["modules"]))
        if not ignore_backbone_mismatch and not fingerprints_match(
            source.get("fingerprint"), fingerprint(self.qformer)
        ):
            raise BackboneMismatchError(
                f"The checkpoint '{checkpoint}' was built on the Q-Former of '{source['name_or_path']}', but the "
                "Q-Former found there now has different weights. Pass `ignore_backbone_mismatch=True` to load anyway."
            )

    # ------------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------------

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        qformer_input_ids: torch.LongTensor,
        qformer_attention_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Visual tokens before the adapter: (num_images, num_query_tokens [+ num_patches], LLM width).

        The Q-Former reads the tower's output (InstructBLIP's is post-layernorm) and the instruction; the patch
        branch reads `vision_feature_layer` (second-to-last) without the CLS token. Returned as transformers'
        vision-language models do: a `BaseModelOutputWithPooling` with the visual tokens as `pooler_output` and the
        vision tower's states (`output_hidden_states`, `output_attentions` reach the tower); a tuple with
        `return_dict=False` (default: `config.return_dict`)."""
        self.check_pixel_values(pixel_values, kwargs.get("interpolate_pos_encoding", False))
        self.check_qformer_inputs(pixel_values, qformer_input_ids, qformer_attention_mask)
        asked = kwargs.pop("output_hidden_states", None)
        asked = asked if asked is not None else self.config.vision_config.output_hidden_states
        outputs = self.vision_tower(
            pixel_values=pixel_values,  # the tower casts them to its patch embedding's dtype (as in InstructBLIP)
            output_hidden_states=bool(asked) or self.config.use_patch_branch,
            **kwargs,
        )
        self.check_tower_output(outputs.last_hidden_state)
        qformer_dtype = self.query_tokens.dtype
        image_embeds = outputs.last_hidden_state.to(self.query_tokens.device, qformer_dtype)
        num_images = image_embeds.shape[0]
        queries = self.query_tokens.expand(num_images, -1, -1)
        if qformer_attention_mask is None:
            qformer_attention_mask = torch.ones_like(qformer_input_ids)
        query_mask = torch.ones(queries.shape[:2], dtype=qformer_attention_mask.dtype, device=queries.device)
        # Positions counted over the instruction's real tokens: the same for a left-padded instruction (batches of
        # transformers' pipeline) as for our processor's right-padded one (InstructBLIP counts from the first slot).
        positions = (qformer_attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
        query_output = self.qformer(
            input_ids=qformer_input_ids,
            attention_mask=torch.cat([query_mask, qformer_attention_mask], dim=1),
            position_ids=positions,
            query_embeds=queries,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(
                image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device
            ),
        ).last_hidden_state[:, : queries.shape[1]]
        tokens = [self.query_projection(query_output)]
        if self.patch_projection is not None:
            hidden = outputs.hidden_states[self.config.vision_feature_layer]
            self.check_patch_count(hidden.shape[1])
            patches = hidden[:, self.config.num_prefix_tokens :]
            weight = self.patch_projection.weight
            tokens.append(self.patch_projection(patches.to(weight.device, weight.dtype)))
        output = image_features_output(torch.cat(tokens, dim=1), outputs)
        if not asked and output.hidden_states is not None:
            # Read for the patch branch only: return just that layer, as transformers' models capture only the
            # hidden states they use unless output_hidden_states is asked for.
            used = self.config.vision_feature_layer % len(output.hidden_states)
            output.hidden_states = tuple(h if i == used else None for i, h in enumerate(output.hidden_states))
        return output if self._return_dict(return_dict) else output.to_tuple()

    def check_processor(self, processor: Any) -> None:
        """`FrozenBackbonesPreTrainedModel.check_processor`, and a Q-Former tokenizer that fits the Q-Former's
        vocabulary (one with more tokens is not the one it was trained with: the LLM's, for a Q-Former taken from
        InstructBLIP, which reads BERT's) and a `qformer_max_length` within its positions (a longer instruction
        stopped inside the Q-Former at the first long sample)."""
        super().check_processor(processor)
        positions = self.config.qformer_config.max_position_embeddings
        if processor.qformer_max_length > positions:
            raise ValueError(
                f"The processor cuts instructions at qformer_max_length={processor.qformer_max_length} tokens, but "
                f"the Q-Former reads at most {positions} (its max_position_embeddings): build the processor with "
                f"qformer_max_length={positions} or less."
            )
        tokens, vocabulary = len(processor.qformer_tokenizer), self.config.qformer_config.vocab_size
        if tokens > vocabulary:
            raise ValueError(
                f"The processor's Q-Former tokenizer has {tokens} tokens, more than the Q-Former's vocabulary "
                f"({vocabulary}): it is not the tokenizer the Q-Former reads (from_instructblip's processor takes "
                "InstructBLIP's). Build it with CromeProcessor.from_model(model)."
            )

    def check_tower_output(self, last_hidden_state: torch.Tensor) -> None:
        """The Q-Former cross-attends to a sequence of tokens per image, (images, tokens, width). Towers that end in
        a feature map, (images, channels, height, width), pass the config checks (they have a `hidden_size` and
        layers) but stopped inside the Q-Former with a matrix-shape error: SAM's and SAM-HQ's vision encoders,
        ViTDet, PP-FormulaNet's."""
        if last_hidden_state.dim() == 3:
            return
        raise ValueError(
            f"The vision tower {type(self.vision_tower).__name__} returned an output of shape "
            f"{tuple(last_hidden_state.shape)}, a feature map (images, channels, height, width), not a sequence of "
            "patch tokens (images, tokens, width), which CROME's Q-Former reads. Pass a ViT-style tower that returns "
            "tokens (CLIP, SigLIP, BLIP / InstructBLIP, DINOv2, ...)."
        )

    def check_patch_count(self, num_tokens: int) -> None:
        """The tower's output must be its prefix tokens then the patches the config counts: the processor expands
        each <image> to that many placeholders. A tower that interpolates its position embeddings (DINOv2) takes
        images of any size and returns another count, which would fill the placeholders with other images' tokens."""
        prefix, patches = self.config.num_prefix_tokens, self.config.num_patches
        if is_compiling() or num_tokens == prefix + patches:
            return
        size = square_side(self.config.vision_config, "image_size")
        raise ValueError(
            f"The vision tower returned {num_tokens} tokens per image, but CROME's patch branch expects {prefix} before "
            f"the patches + {patches} patches (its config: image_size={size}, patch_size="
            f"{self.config.vision_config.patch_size}). Give it {size}x{size} images (the processor resizes to the "
            "tower's size: check its image processor's size), or build CROME with use_patch_branch=False."
        )

    def check_qformer_inputs(
        self,
        pixel_values: torch.Tensor,
        qformer_input_ids: torch.LongTensor,
        qformer_attention_mask: torch.Tensor | None,
    ) -> None:
        """Refuse an instruction the Q-Former cannot read, naming the argument (before: a size mismatch or an index
        error from inside the Q-Former): one row of integer ids per image, a mask of the same shape, no longer than
        the Q-Former's positions, ids in the Q-Former's vocabulary. Skipped while torch.compile traces, as
        `check_inputs`."""
        if is_compiling():
            return
        check_token_ids(
            qformer_input_ids,
            "qformer_input_ids",
            "num_images, instruction length",
            "CromeProcessor returns it so.",
        )
        if qformer_input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"qformer_input_ids has {qformer_input_ids.shape[0]} rows but pixel_values {pixel_values.shape[0]} "
                "image(s): the Q-Former reads one instruction per image (the prompt of the sample the image belongs "
                "to). Build both with CromeProcessor."
            )
        if qformer_attention_mask is not None and qformer_attention_mask.shape != qformer_input_ids.shape:
            raise ValueError(
                f"qformer_attention_mask has shape {tuple(qformer_attention_mask.shape)} but qformer_input_ids "
                f"{tuple(qformer_input_ids.shape)}: they must be the same shape."
            )
        positions = self.config.qformer_config.max_position_embeddings
        if qformer_input_ids.shape[1] > positions:
            raise ValueError(
                f"qformer_input_ids are {qformer_input_ids.shape[1]} tokens long, but the Q-Former reads at most "
                f"{positions} (its max_position_embeddings). Build the processor with qformer_max_length={positions} "
                "or less."
            )
        vocab_size = vocabulary_size(self.qformer.get_input_embeddings())
        bad = (qformer_input_ids < 0) | (qformer_input_ids >= vocab_size)
        if bad.any():
            raise ValueError(
                f"qformer_input_ids contain ids outside the Q-Former's vocabulary (0..{vocab_size - 1}): "
                f"{qformer_input_ids[bad][:5].tolist()}. Tokenize the instruction with the processor's "
                "qformer_tokenizer."
            )

    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        past_length: int = 0,
    ) -> torch.Tensor:
        """LLM input embeddings: prompt tokens through the adapter's text branch (prompt tokens only: never
        answer or generated tokens), image placeholders replaced by visual tokens through its vision branch."""
        return self._embed_inputs(
            input_ids, pixel_values, qformer_input_ids, qformer_attention_mask, prompt_mask, past_length
        )[0]

    def _embed_inputs(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None,
        qformer_input_ids: torch.LongTensor | None,
        qformer_attention_mask: torch.Tensor | None,
        prompt_mask: torch.Tensor | None,
        past_length: int,
        output_attentions: bool | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """`embed_inputs`, with `get_image_features`' output (None without images)."""
        image_outputs = None
        image_mask = input_ids == self.config.image_token_id
        inputs_embeds = embed_text_tokens(self.get_input_embeddings(), input_ids, self.config.image_token_id)
        if prompt_mask is not None:
            # generate passes the prompt's mask at every step: align it with the positions fed now.
            total = past_length + input_ids.shape[1]
            if not is_compiling() and (
                prompt_mask.dim() != 2
                or prompt_mask.shape[0] != input_ids.shape[0]
                or prompt_mask.shape[1] > total
            ):
                raise ValueError(
                    f"prompt_mask has shape {tuple(prompt_mask.shape)} but input_ids {tuple(input_ids.shape)}: it "
                    "must be (batch, at most the sequence length), 1 on the prompt's text tokens, as CromeProcessor "
                    "returns it."
                )
            padded = torch.nn.functional.pad(prompt_mask, (0, max(0, total - prompt_mask.shape[1])))
            step_mask = padded[:, past_length:total].bool() & ~image_mask
            if step_mask.any():
                adapted = self.adapter(inputs_embeds, "text")
                inputs_embeds = torch.where(step_mask.unsqueeze(-1), adapted, inputs_embeds)
        if pixel_values is not None:
            if qformer_input_ids is None:
                raise ValueError(
                    "CROME's Q-Former reads the instruction: pass qformer_input_ids with pixel_values (CromeProcessor "
                    "makes them; TRL's GRPOTrainer and RLOOTrainer leave them out, so they cannot train CROME)."
                )
            check_image_token_count(
                image_mask, pixel_values.shape[0], self.config.num_image_tokens, "CromeProcessor"
            )
            vision_kwargs = {"output_attentions": True} if output_attentions else {}
            image_outputs = self.get_image_features(
                pixel_values, qformer_input_ids, qformer_attention_mask, return_dict=True, **vision_kwargs
            )
            visual = self.adapter(image_outputs.pooler_output, "vision")
            inputs_embeds = inputs_embeds.masked_scatter(
                image_mask.to(inputs_embeds.device).unsqueeze(-1),
                visual.to(inputs_embeds.device, inputs_embeds.dtype),
            )
        elif past_length == 0:
            refuse_images_without_pixels(image_mask)
        return inputs_embeds, image_outputs

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        labels: torch.LongTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        supervised_logits_only: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> VisionLanguageCausalLMOutput | Seq2SeqLMOutput | tuple:
        r"""
        prompt_mask: (batch, prompt length) 1 on the prompt's text tokens (the adapter's text branch), from
            `CromeProcessor`. Without it no text token is adapted.
        cache: the KV cache (transformers 5.24 calls it `cache`; earlier releases `past_key_values`, which is
            accepted as a keyword too).
        labels: decoder-only LLM: the full sequence with -100 on the prompt; encoder-decoder: the answer.
        supervised_logits_only: decoder-only LLM with `labels`: logits only where the next token is supervised
            (same loss; see `causal_lm_output`). Encoder-decoder LLMs score only the answer anyway.
        position_ids, logits_to_keep, shift_labels (keyword): decoder-only LLM only; an encoder-decoder LLM refuses
            them (`refuse_decoder_only_options`).
        use_cache, return_dict, output_attentions, ... (keywords): as in transformers' models (LLaVA's forward
            takes them the same way: `use_cache` goes to the LLM, `return_dict=False` returns a tuple).
        """
        if input_ids is None:
            raise ValueError("CROME needs input_ids (the processor's output).")
        refuse_inputs_embeds(kwargs.pop("inputs_embeds", None))
        cache = pick_cache(cache, kwargs.pop("past_key_values", None), type(self).__name__)
        refuse_other_models_inputs(type(self).__name__, kwargs, LAVIN_INPUTS)
        past_length = cache.get_seq_length() if cache is not None else 0
        self.check_inputs(
            input_ids,
            attention_mask,
            pixel_values,
            0 if self.is_encoder_decoder_llm else past_length,
            position_ids=None if self.is_encoder_decoder_llm else position_ids,  # refused below for T5
        )
        if self.is_encoder_decoder_llm:
            refuse_decoder_only_options(position_ids, logits_to_keep, kwargs)
            check_decoder_input_ids(decoder_input_ids, input_ids.shape[0])
            past_length = 0  # the encoder input is always the whole prompt
        else:
            refuse_encoder_decoder_options(decoder_input_ids, decoder_attention_mask)
        inputs_embeds, image_outputs = self._embed_inputs(
            input_ids,
            pixel_values,
            qformer_input_ids,
            qformer_attention_mask,
            prompt_mask,
            past_length,
            output_attentions=kwargs.get("output_attentions"),
        )
        # use_cache, output_attentions, the loss keywords (taken out before the LLM call), ...
        llm_kwargs = dict(attention_mask=attention_mask, **cache_kwargs(cache), **kwargs)
        if self.is_encoder_decoder_llm:
            return self._encoder_decoder_output(
                inputs_embeds, labels, decoder_input_ids, decoder_attention_mask, llm_kwargs
            )
        llm_kwargs["position_ids"] = position_ids
        add_per_layer_inputs(
            self.language_model, llm_kwargs, input_ids, input_ids == self.config.image_token_id
        )
        return self._decoder_only_output(
            inputs_embeds, image_outputs, labels, logits_to_keep, supervised_logits_only, llm_kwargs
        )

    def _encoder_decoder_output(
        self,
        inputs_embeds: torch.Tensor,
        labels: torch.LongTensor | None,
        decoder_input_ids: torch.LongTensor | None,
        decoder_attention_mask: torch.Tensor | None,
        llm_kwargs: dict[str, Any],
    ) -> Seq2SeqLMOutput:
        """The encoder-decoder LLM (T5) on the prepared encoder input; the loss over the answer (`labels`)."""
        loss_kwargs = {key: llm_kwargs.pop(key) for key in LOSS_KWARGS if key in llm_kwargs}
        if labels is not None:
            self.check_labels(labels, inputs_embeds.shape[0], None)
            labels = self._text_labels(labels, loss_kwargs.get("ignore_index", -100))
        if labels is None and decoder_input_ids is None:  # score the first answer token
            start = self.language_model.config.decoder_start_token_id
            decoder_input_ids = torch.full((inputs_embeds.shape[0], 1), start, device=inputs_embeds.device)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            labels=labels,  # only to derive decoder_input_ids; the loss is computed below
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            **llm_kwargs,
        )
        loss = None
        if labels is not None:
            logits = outputs.logits.float()
            loss = fixed_cross_entropy(
                logits.view(-1, logits.shape[-1]), labels.view(-1).to(logits.device), **loss_kwargs
            )
        return Seq2SeqLMOutput(
            loss=loss,
            logits=outputs.logits,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            **cache_kwargs(cache_of(outputs)),
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.LongTensor:
        """Generate; the vision tower and the Q-Former run once per call.

        Decoder-only LLM: `GenerationMixin.generate` (the image runs in the prefill step; `pixel_values` is
        dropped afterwards), returning prompt + new tokens. Encoder-decoder LLM: the encoder input is embedded
        once and handed to the LLM's own `generate`, which returns the decoder's tokens.
        """
        self.check_assistant_model(kwargs.get("assistant_model"))
        refuse_inputs_embeds(kwargs.pop("inputs_embeds", None))
        if self.is_encoder_decoder_llm:
            if kwargs.get("assistant_model") is not None:
                # the LLM's generate would run the assistant's encoder on our embedded inputs, not on its own
                raise ValueError(
                    "assistant_model works with a decoder-only LLM; this CROME's LLM is an encoder-decoder "
                    f"({self.config.text_config.model_type}). Use generate(..., prompt_lookup_num_tokens=10) instead."
                )
            refuse_options_needing_prompt_ids(kwargs, self.language_model.generation_config)
            inputs_embeds = self.embed_inputs(
                input_ids, pixel_values, qformer_input_ids, qformer_attention_mask, prompt_mask
            )
            return self.language_model.generate(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs
            )
        return super().generate(
            input_ids=input_ids,
            pixel_values=pixel_values,
            qformer_input_ids=qformer_input_ids,
            qformer_attention_mask=qformer_attention_mask,
            prompt_mask=prompt_mask,
            attention_mask=attention_mask,
            **kwargs,
        )


def refuse_options_needing_prompt_ids(kwargs: dict[str, Any], default_config: Any) -> None:
    """An encoder-decoder CROME hands its LLM embedded inputs (the images placed), not token ids. The generate
    options that read the prompt's ids were ignored by transformers with a warning (`encoder_repetition_penalty`,
    `encoder_no_repeat_ngram_size`) or stopped inside it (`token_healing`: torch's reshape error; a negative prompt
    for classifier-free guidance: "You must specify exactly one of input_ids or inputs_embeds")."""
    config = kwargs.get("generation_config") or default_config
    penalty = kwargs.get("encoder_repetition_penalty", getattr(config, "encoder_repetition_penalty", None))
    ngram_size = kwargs.get(
        "encoder_no_repeat_ngram_size", getattr(config, "encoder_no_repeat_ngram_size", None)
    )
    healing = kwargs.get("token_healing", getattr(config, "token_healing", None))
    asked = [
        name
        for name, value, off in (
            ("encoder_repetition_penalty", penalty, 1.0),
            ("encoder_no_repeat_ngram_size", ngram_size, 0),
            ("token_healing", healing, False),
            ("negative_prompt_ids", kwargs.get("negative_prompt_ids"), None),
        )
        if value not in (None, off)
    ]
    if asked:
        raise ValueError(
            f"{', '.join(asked)} is not supported by a CROME around an encoder-decoder LLM: its LLM receives "
            "embedded inputs (the images placed in them): it has no prompt token ids to read. Use "
            "repetition_penalty / no_repeat_ngram_size (or guidance_scale without a negative prompt), or a "
            "decoder-only LLM."
        )


def refuse_inputs_embeds(inputs_embeds: torch.Tensor | None) -> None:
    """CROME embeds its inputs itself. `inputs_embeds=None` is taken (PEFT's task wrappers pass it with the ids);
    embeddings in place of ids are refused."""
    if inputs_embeds is not None:
        raise ValueError(
            "CROME takes input_ids, not inputs_embeds: its Q-Former and adapter read the prompt from the ids (the "
            "image placeholders and prompt_mask). Pass the processor's input_ids."
        )


__all__ = ["CromeForConditionalGeneration", "CromePreTrainedModel", "STAGE_MODULES"]
