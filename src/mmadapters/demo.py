"""The gradio chat demo behind `spaces/lavin/`, `spaces/crome/` and `mmadapters demo`.

A multimodal chat: image upload and text, multi-turn with images kept in the history, text-only turns,
streamed answers, generation settings, clickable easy-vqa examples. Limits: the largest image accepted, the
most new tokens, a queue with a concurrency limit, a generation timeout. A bad or unsupported file becomes a
message in the chat, never a stack trace, and the app keeps serving.

Which model: `--model` or the `MMADAPTERS_MODEL` environment variable (a Hub repo id or a local checkpoint
folder), else the `model` named in the Space's `mmadapters_space.json` (written by `mmadapters push-space`),
else the quickstart checkpoint when present, else a fresh model around the embedded backbones. Where it runs:
`--dtype` and `--device-map` (or MMADAPTERS_DTYPE / MMADAPTERS_DEVICE_MAP, for a Space on GPU hardware, e.g.
`bfloat16` and `cuda`); default float32 on CPU. Backbones that are not where the checkpoint names them:
`--text-model` / `--vision-model` (or MMADAPTERS_TEXT_MODEL / MMADAPTERS_VISION_MODEL); without a checkpoint they
replace the embedded backbones of the fresh model.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import MMAdaptersError
from .evaluation.generate import ContextFullError, answer_length, chat_inputs
from .hub import SPACE_SETTINGS_NAME
from .inference_loading import (
    USER_ERRORS,
    add_inference_arguments,
    inference_keywords,
    inputs_on_model_device,
    load_for_inference,
    loading_options,
)
from .library_logs import quiet_library_logs
from .processing import load_image
from .validation import port_number, positive_float, positive_int

MODEL_ENV = "MMADAPTERS_MODEL"
QUICKSTART_CHECKPOINT = os.path.join("quickstart_output", "checkpoint")


@dataclass
class DemoLimits:
    """What one request may ask for. Defaults suit a CPU Space."""

    max_image_pixels: int = 4096 * 4096
    max_new_tokens: int = 256
    timeout_s: float = 60.0  # generation stops after this long (the answer so far is kept)
    concurrency: int = 1  # generations at a time; others wait in the queue
    queue_size: int = 16


# ------------------------------------------------------------------------------------------------
# Choosing and loading the model
# ------------------------------------------------------------------------------------------------


def resolve_model_name(model: str | None, app_dir: str | None = None) -> str | None:
    """The model to serve: the argument, the environment, the Space settings, the quickstart checkpoint, or
    None (meaning: the embedded backbones)."""
    if model:
        return model
    if os.environ.get(MODEL_ENV):
        return os.environ[MODEL_ENV]
    if app_dir and os.path.isfile(os.path.join(app_dir, SPACE_SETTINGS_NAME)):
        with open(os.path.join(app_dir, SPACE_SETTINGS_NAME)) as f:
            return json.load(f).get("model")
    for root in (os.getcwd(), app_dir and os.path.dirname(os.path.dirname(app_dir))):
        if root and os.path.isfile(os.path.join(root, QUICKSTART_CHECKPOINT, "config.json")):
            return os.path.join(root, QUICKSTART_CHECKPOINT)
    return None


def load_demo_model(
    model_name: str | None,
    kind: str = "lavin",
    dtype: str = "float32",
    device_map: str | None = None,
    text_model: str | None = None,
    vision_model: str | None = None,
    ignore_backbone_mismatch: bool = False,
) -> tuple[Any, Any, str]:
    """(model, processor, description) for a checkpoint (any of ours), or for `kind` around the embedded
    backbones when `model_name` is None; the other arguments as in `mmadapters.inference_loading` (without a
    checkpoint, the backbones given replace the embedded ones)."""
    if model_name is not None:
        model, processor = load_for_inference(
            model_name, dtype, device_map, text_model, vision_model, ignore_backbone_mismatch
        )
        return model, processor, model_name

    from .methods import method
    from .modeling.embedded import embedded_backbones

    embedded_text, embedded_vision = embedded_backbones()
    text_model, vision_model = text_model or embedded_text, vision_model or embedded_vision
    model, processor = method(kind).build(text_model, vision_model, **loading_options(dtype, device_map))
    if (text_model, vision_model) == (embedded_text, embedded_vision):
        backbones = "the embedded backbones"
    else:
        backbones = f"{text_model} and {vision_model}"
    description = f"untrained {kind} adapters around {backbones} (run `make quickstart` for a trained one)"
    return model.eval(), processor, description


# ------------------------------------------------------------------------------------------------
# Turning gradio's chat history into model inputs
# ------------------------------------------------------------------------------------------------


def _file_path(part: Any) -> str | None:
    """The path of a file part in any of the shapes gradio uses (typed dict, {"path"}, tuple, FileData)."""
    if isinstance(part, str):
        return None
    if isinstance(part, tuple):
        return part[0] if part else None
    if isinstance(part, dict):
        return _file_path(part.get("file")) if part.get("type") == "file" else part.get("path")
    return getattr(part, "path", None)


def _text(part: Any) -> str | None:
    if isinstance(part, str):
        return part
    if isinstance(part, dict) and part.get("type") == "text":
        return part.get("text")
    return None


def _turns(history: list[dict]) -> list[tuple[str, list[str], str]]:
    """Group gradio messages into (role, image paths, text) turns; consecutive messages of a role merge."""
    turns: list[tuple[str, list[str], str]] = []
    for message in history:
        content = message["content"]
        parts = content if isinstance(content, list) else [content]
        files = [p for p in (_file_path(part) for part in parts) if p]
        text = " ".join(t for t in (_text(part) for part in parts) if t)
        if turns and turns[-1][0] == message["role"]:
            role, old_files, old_text = turns[-1]
            turns[-1] = (role, old_files + files, " ".join(t for t in (old_text, text) if t))
        else:
            turns.append((message["role"], files, text))
    return turns


ERROR_MARK = "⚠️"


def build_conversation(
    message: dict | str, history: list[dict], max_image_pixels: int
) -> tuple[list[dict], list[Any]]:
    """Chat-template messages and the images they refer to (in order), for the history plus the new message.

    The new message's files are validated as they are read (InvalidImageError names the file and the
    problem). Exchanges that ended in an error message are left out of the conversation, so one bad upload
    does not break every later turn."""
    if isinstance(message, str):
        message = {"text": message, "files": []}
    new_files = [_file_path(f) or f for f in message.get("files", [])]
    turns = _turns(history)
    kept: list[tuple[str, list[str], str]] = []
    for turn in turns:
        if turn[0] == "assistant" and turn[2].startswith(ERROR_MARK):
            if kept and kept[-1][0] == "user":
                kept.pop()  # the request that failed
            continue
        kept.append(turn)
    kept.append(("user", [f for f in new_files if isinstance(f, str)], message.get("text") or ""))
    messages, images = [], []
    for role, files, text in kept:
        content: list[dict] = []
        if role == "user":
            for path in files:
                # A Path, never a URL string: the server reads uploaded files only, it fetches nothing for a client.
                images.append(load_image(Path(path), max_image_pixels, what="uploaded file"))
                content.append({"type": "image"})
        if text:
            content.append({"type": "text", "text": text})
        if content:
            messages.append({"role": role, "content": content})
    last = messages[-1] if messages else None
    if last is None or last["role"] != "user" or not any(p["type"] == "text" for p in last["content"]):
        raise ValueError("Type a question (an image alone is not a question).")
    return messages, images


# ------------------------------------------------------------------------------------------------
# The chat function
# ------------------------------------------------------------------------------------------------


def _title(kind: str) -> str:
    from .methods import METHODS

    return METHODS[kind].title if kind in METHODS else kind


def make_chat_fn(model: Any, processor: Any, limits: DemoLimits):
    """The generator gradio calls: yields the growing answer (streaming), or one readable error message."""
    from transformers import TextIteratorStreamer

    def chat(
        message: dict | str,
        history: list[dict],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 0.9,
    ) -> Iterator[str]:
        try:
            messages, images = build_conversation(message, history or [], limits.max_image_pixels)
            inputs = inputs_on_model_device(chat_inputs(processor, messages, images), model)
            asked = max(1, min(int(max_new_tokens), limits.max_new_tokens))
            max_new_tokens = answer_length(model, inputs["input_ids"].shape[1], asked)
        except ContextFullError as error:
            yield f"{ERROR_MARK} {error}: clear the chat and start again with a shorter question."
            return
        except USER_ERRORS as error:
            yield f"{ERROR_MARK} {error}"
            return
        sampling = {"do_sample": False}
        if temperature and temperature > 0:
            sampling = {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p)}
        streamer = TextIteratorStreamer(
            processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=limits.timeout_s + 30
        )
        failure: list[BaseException] = []

        def run() -> None:
            try:
                model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    max_time=limits.timeout_s,
                    streamer=streamer,
                    **sampling,
                )
            except BaseException as error:  # reported in the chat below
                failure.append(error)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        started = time.monotonic()
        thread.start()
        answer = ""
        try:
            for piece in streamer:
                answer += piece
                if answer.strip():
                    yield answer
        except Exception:  # the streamer timed out: generation is stuck
            failure.append(TimeoutError(f"no answer within {limits.timeout_s:.0f} s"))
        thread.join(timeout=1.0)
        if failure:
            yield (
                answer + "\n\n" if answer.strip() else ""
            ) + f"{ERROR_MARK} Generation failed: {failure[0]}"
        elif not answer.strip():
            yield "(the model gave an empty answer)"
        elif time.monotonic() - started >= limits.timeout_s:
            yield answer + f"\n\n(stopped: the {limits.timeout_s:g} s generation time limit was reached)"

    return chat


# ------------------------------------------------------------------------------------------------
# The app
# ------------------------------------------------------------------------------------------------


def build_demo(
    model: Any,
    processor: Any,
    description: str,
    kind: str,
    limits: DemoLimits,
    examples_dir: str | None = None,
):
    """A `gr.ChatInterface` (multimodal, streaming) around a loaded model, with its queue limits set."""
    import gradio as gr

    examples = None
    if examples_dir and os.path.isdir(examples_dir):
        files = sorted(f for f in os.listdir(examples_dir) if f.endswith(".png"))
        questions = ("What is the color of the shape?", "What shape is in the image?", "Is there a circle?")
        messages = [
            {"text": question, "files": [os.path.join(examples_dir, name)]}
            for name, question in zip(files, questions, strict=False)
        ]
        messages.append({"text": "What is the capital of France?", "files": []})
        # With additional inputs, each example lists their values too (greedy, 64 tokens).
        examples = [[message, min(64, limits.max_new_tokens), 0.0, 0.9] for message in messages]
    demo = gr.ChatInterface(
        make_chat_fn(model, processor, limits),
        multimodal=True,
        title=_title(kind),
        description=f"Model: {description}. Attach an image (or not) and ask a question; images stay in the "
        "conversation.",
        textbox=gr.MultimodalTextbox(
            file_types=["image"], file_count="multiple", placeholder="Ask about an image..."
        ),
        additional_inputs=[
            gr.Slider(
                1, limits.max_new_tokens, value=min(64, limits.max_new_tokens), step=1, label="Max new tokens"
            ),
            gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)"),
            gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p"),
        ],
        examples=examples,
        cache_examples=False,
        api_name="chat",
    )
    demo.queue(default_concurrency_limit=limits.concurrency, max_size=limits.queue_size)
    return demo


def parse_args(argv: list[str] | None = None, kind: str = "lavin") -> argparse.Namespace:
    return build_parser(kind).parse_args(argv)


def build_parser(kind: str = "lavin", add_help: bool = True) -> argparse.ArgumentParser:
    """The demo's options (`python spaces/KIND/app.py ...`; `mmadapters demo` takes them as a parent parser,
    `add_help=False`, so that `mmadapters demo -h` lists them)."""
    parser = argparse.ArgumentParser(description=f"The {kind} chat demo", add_help=add_help)
    parser.add_argument("model", nargs="?", help="Hub repo id or local checkpoint folder")
    parser.add_argument("--model", dest="model_option", help="same as the positional argument")
    parser.add_argument(
        "--kind",
        default=kind,
        choices=["lavin", "crome"],
        help="the method: the model for the embedded default and the Space's examples",
    )
    parser.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="the address to serve on (default: %(default)s; GRADIO_SERVER_NAME)",
    )
    parser.add_argument(
        "--port",
        type=port_number,
        default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)),
        help="the port (default: %(default)s; GRADIO_SERVER_PORT)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=DemoLimits.max_new_tokens,
        help="the most new tokens an answer may have (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=positive_float, default=DemoLimits.timeout_s, help="generation timeout (s)"
    )
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        default=DemoLimits.concurrency,
        help="generations run at once; others queue (default: %(default)s)",
    )
    add_inference_arguments(parser, environment=True)
    return parser


class PortInUseError(MMAdaptersError, OSError):
    """The demo's port is taken by another server."""


def check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise PortInUseError(
                f"Port {port} on {host} is in use ({error.strerror}): pass --port with a free port, or stop the "
                "server that holds it."
            ) from None


def launch(
    argv: list[str] | None = None,
    kind: str = "lavin",
    app_dir: str | None = None,
    block: bool = True,
    args: argparse.Namespace | None = None,
):
    """Load the model, build the app and serve it; prints the URL. Returns the running demo. The options: `argv`
    (parsed here), or `args` already parsed by `build_parser`'s options (`mmadapters demo`)."""
    quiet_library_logs()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if args is None:
        args = parse_args(argv, kind)
    check_port_free(args.host, args.port)  # before loading the model: a taken port is known at once
    limits = DemoLimits(
        max_new_tokens=args.max_new_tokens, timeout_s=args.timeout, concurrency=args.concurrency
    )
    name = resolve_model_name(args.model_option or args.model, app_dir)
    model, processor, description = load_demo_model(name, args.kind, **inference_keywords(args))
    kind = getattr(model.config, "model_type", args.kind)
    examples = os.path.join(app_dir or os.path.join("spaces", kind), "examples")
    demo = build_demo(model, processor, description, kind, limits, examples)
    demo.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True)
    print(f"mmadapters demo ({kind}, {description}) running on {demo.local_url}", flush=True)
    if block:
        demo.block_thread()
    return demo
