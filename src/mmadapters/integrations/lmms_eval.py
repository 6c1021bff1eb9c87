"""lmms-eval model plugin: `lmms-eval --model lavin --model_args pretrained=REPO_OR_FOLDER --tasks mme` (or
`--model crome`).

Registered through lmms-eval's own entry-point group `lmms_eval.models` (see pyproject.toml), so lmms-eval finds
both models once mmadapters is installed, with no environment variable or fork. Each question goes through the
checkpoint's chat template (one user turn: the image, then lmms-eval's context text), as `mmadapters eval` does.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from transformers import GenerationConfig

from ..evaluation.generate import answer_tokens
from ..inference_loading import inputs_on_model_device, load_for_inference

logger = logging.getLogger(__name__)


class MMAdaptersLMM(lmms):
    """An mmadapters checkpoint as an lmms-eval model (`model_kind` says which of ours it must be).

    model_args: `pretrained` (Hub id or folder), `batch_size` (questions per generate call, default 8),
    `max_new_tokens` (default 64, unless a task's generation kwargs say otherwise), `device` (default cpu; e.g.
    cuda: one GPU per process under `accelerate launch`), `dtype` (the frozen backbones': float32 (default),
    bfloat16, float16 or auto) and `device_map` (instead of `device`: "auto" splits the model over the GPUs), as
    lmms-eval's own Hugging Face models take them; `text_model` / `vision_model` (a local folder or Hub id) when
    a backbone is not where the checkpoint names it, and `ignore_backbone_mismatch` (true / false) to load the
    adapters onto backbones whose weights differ from those they were trained on."""

    model_kind = ""

    def __init__(
        self,
        pretrained: str,
        batch_size: int | str = 8,
        max_new_tokens: int | str = 64,
        device: str = "cpu",
        dtype: str = "float32",
        device_map: str = "",
        text_model: str = "",
        vision_model: str = "",
        ignore_backbone_mismatch: bool | str = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(
                f"Unknown model_args {sorted(kwargs)} for --model {self.model_kind}; known: pretrained, batch_size, "
                "max_new_tokens, device, dtype, device_map, text_model, vision_model, ignore_backbone_mismatch."
            )
        import mmadapters  # noqa: F401  (registers our models with the Auto classes)

        self.model, self.processor = load_for_inference(
            pretrained,
            dtype,
            device_map or device_of_this_process(device),
            text_model,
            vision_model,
            ignore_backbone_mismatch=parse_flag(ignore_backbone_mismatch, "ignore_backbone_mismatch"),
        )
        if self.model.config.model_type != self.model_kind:
            raise ValueError(
                f"{pretrained} is a {self.model.config.model_type} checkpoint; use --model "
                f"{self.model.config.model_type}."
            )
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self._ignored_task_options: set[str] = set()  # logged once each

    def _prompt(self, context: str, num_images: int) -> str:
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": context}]
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )

    def _visuals(self, doc_to_visual: Any, doc_id: int, task: str, split: str) -> list[Any]:
        if doc_to_visual is None:
            return []
        visuals = [v for v in doc_to_visual(self.task_dict[task][split][doc_id]) or [] if v is not None]
        if len(visuals) > 1:
            raise ValueError(
                f"{task} gives {len(visuals)} images for one question; LaVIN and CROME take one."
            )
        return visuals

    def _inputs(self, prompts: list[str], images: list[list[Any]], answers: list[str] | None = None) -> Any:
        return inputs_on_model_device(
            self.processor(images=images, text=prompts, answers=answers), self.model
        )

    @torch.no_grad()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy (or sampled, when the task says so) answers, cut at the task's `until` strings; requests are
        batched in order, `batch_size` at a time, among neighbours with the same generation kwargs."""
        answers: list[str] = []
        start = 0
        while start < len(requests):
            gen_kwargs = requests[start].args[1]
            stop = start
            while (
                stop < len(requests)
                and stop - start < self.batch_size
                and requests[stop].args[1] == gen_kwargs
            ):
                stop += 1
            prompts, images = [], []
            for request in requests[start:stop]:
                context, _, doc_to_visual, doc_id, task, split = request.args
                visuals = self._visuals(doc_to_visual, doc_id, task, split)
                prompts.append(self._prompt(context, len(visuals)))
                images.append(visuals)
            inputs = self._inputs(prompts, images)
            output = self.model.generate(**inputs, **self._generate_options(gen_kwargs))
            texts = self.processor.batch_decode(
                answer_tokens(self.model, inputs["input_ids"], output), skip_special_tokens=True
            )
            until = gen_kwargs.get("until") or []
            for text in texts:
                for marker in [until] if isinstance(until, str) else until:
                    text = text.split(marker)[0] if marker else text
                answers.append(text)
            start = stop
        return answers

    def _generate_options(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        """A task's `generation_kwargs` as `generate` options, as lmms-eval's LLaVA model reads them: sampling when
        `temperature` > 0 (then `temperature` and `top_p` apply), `num_beams`, `max_new_tokens`; any other
        transformers generation option (`top_k`, `repetition_penalty`, ...) passes through. Keys that are not
        generation options (`until`, cut here afterwards; other models' settings such as `image_aspect_ratio`)
        are not passed; the latter are logged once."""
        temperature = float(gen_kwargs.get("temperature") or 0)
        sampling = temperature > 0
        options: dict[str, Any] = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            "num_beams": int(gen_kwargs.get("num_beams") or 1),
            "do_sample": sampling,
        }
        if sampling:
            options["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                options["top_p"] = float(gen_kwargs["top_p"])
        handled = {"temperature", "top_p", "do_sample", "num_beams", "max_new_tokens", "until"}
        known = GenerationConfig().to_dict()
        for name, value in gen_kwargs.items():
            if name in handled:
                continue
            if name in known:
                options[name] = value
            elif name not in self._ignored_task_options:
                self._ignored_task_options.add(name)
                logger.warning(
                    "Task generation option %r is not a transformers generation option: ignored.", name
                )
        return options

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(log-probability of the continuation after the context, whether greedy decoding would produce it)."""
        results = []
        for request in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            document = self.task_dict[task][split][doc_id] if task in self.task_dict else None
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(document)
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            inputs = self._inputs([self._prompt(context, len(visuals))], [visuals], [continuation])
            logits = self.model(**inputs).logits.float()
            labels = inputs["labels"]
            if not getattr(self.model.config.get_text_config(), "is_encoder_decoder", False):
                logits, labels = logits[:, :-1], labels[:, 1:]  # position t predicts token t + 1
            supervised = (labels != -100).nonzero()[
                :-1
            ]  # the continuation, without the EOS the processor adds
            chosen = logits[supervised[:, 0], supervised[:, 1]]
            targets = labels[supervised[:, 0], supervised[:, 1]]
            logprob = torch.log_softmax(chosen, dim=-1).gather(1, targets[:, None]).sum().item()
            results.append((logprob, bool((chosen.argmax(-1) == targets).all())))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "Multi-round generation is not supported by the mmadapters lmms-eval plugin."
        )


def parse_flag(value: bool | str, name: str) -> bool:
    """A true/false model_arg (lmms-eval passes them as written: a bool or a string)."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no", ""):
        return False
    raise ValueError(f"model_arg {name} must be true or false, got {value!r}.")


def device_of_this_process(device: str) -> str:
    """`device` for this process: under several processes (`accelerate launch -m lmms_eval`, torchrun), where
    lmms-eval gives each process its share of the requests, a bare "cuda" becomes this process's GPU
    (`cuda:LOCAL_RANK`), as lmms-eval's own models bind it; anything else is kept as given."""
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


class LavinLMM(MMAdaptersLMM):
    """`--model lavin`."""

    model_kind = "lavin"


class CromeLMM(MMAdaptersLMM):
    """`--model crome`."""

    model_kind = "crome"


def manifests() -> list[ModelManifest]:
    """The entry point lmms-eval loads (group `lmms_eval.models`)."""
    return [
        ModelManifest(model_id="lavin", simple_class_path=f"{__name__}.LavinLMM"),
        ModelManifest(model_id="crome", simple_class_path=f"{__name__}.CromeLMM"),
    ]


__all__ = ["CromeLMM", "LavinLMM", "MMAdaptersLMM", "device_of_this_process", "manifests"]
