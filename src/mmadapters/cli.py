"""`mmadapters <command>`: quickstart, train, eval, chat, convert-instructblip, convert-lavin, merge, push."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

from .cli_arguments import add_dataclass_arguments
from .demo import build_parser as build_demo_parser
from .demo import launch as launch_demo
from .errors import MMAdaptersError
from .hub import check_checkpoint_name
from .inference_loading import (
    USER_ERRORS,
    add_inference_arguments,
    inference_keywords,
    inputs_on_model_device,
    load_for_inference,
)
from .library_logs import quiet_library_logs
from .validation import limit_or_all, non_negative_int, positive_float, positive_int

# `mmadapters eval` without --limit: easy-vqa evaluates 1,000 questions (the quickstart's), the benchmarks all.
NO_LIMIT_GIVEN = -1


def _quickstart(args: argparse.Namespace) -> None:
    from .cli_arguments import dataclass_from_arguments
    from .quickstart import QuickstartSettings, run_quickstart

    settings = dataclass_from_arguments(QuickstartSettings, args)
    summary = run_quickstart(
        args.output_dir, settings, resume=args.resume, resume_command=_command_line(args, "--resume")
    )
    checkpoint = summary["checkpoint_dir"]
    eval_command = f"mmadapters eval {checkpoint} --prompt-format {settings.prompt_format}"
    print(
        json.dumps({k: v for k, v in summary.items() if k not in ("settings", "text_only_answers")}, indent=2)
    )
    print(
        f"\nLaVIN went from {summary['accuracy_before']:.1%} to {summary['accuracy_after']:.1%} on "
        f"{summary['num_test_questions']} easy-vqa test questions; {summary['text_only_preserved']:.0%} of held-out "
        f"text-only answers are unchanged. Next: `mmadapters chat {checkpoint}`, "
        f"`mmadapters demo {checkpoint}` (browser chat), `{eval_command}`."
    )


def _command_line(args: argparse.Namespace, *extra: str) -> str:
    """This command as it was run, plus `extra` (e.g. the one that resumes a stopped run with the same flags)."""
    import shlex

    # Run as the `mmadapters` script (e.g. .venv/bin/mmadapters from `make quickstart`): that path; else the module.
    program = (
        [sys.argv[0]]
        if os.path.basename(sys.argv[0]) == "mmadapters"
        else [sys.executable, "-m", "mmadapters.cli"]
    )
    given = [word for word in args.argv if word not in extra]
    return shlex.join([*program, *given, *extra])


def _train(args: argparse.Namespace) -> None:
    from .recipes import is_main_process, train_from_recipe

    final = train_from_recipe(args.recipe, resume=args.resume, overwrite=args.overwrite)
    if is_main_process():
        print(f"Saved the adapter-only checkpoint to {final}")
    # Under torchrun / accelerate launch: a process group left to the interpreter's exit can abort a process
    # after a finished run (gloo, "terminate called without an active exception"), and the launcher fails.
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _eval(args: argparse.Namespace) -> None:
    """Evaluate; the results are printed, written as JSON (`--output`, by default eval_TASK.json in a checkpoint
    folder) and recorded for the model card of a later push."""
    model, processor = load_for_inference(args.checkpoint, **inference_keywords(args))
    if args.task == "easy-vqa":
        result, results_name, command = _eval_easy_vqa(args, model, processor)
    else:
        result, results_name, command = _eval_task(args, model, processor)
    print(json.dumps({k: v for k, v in result.items() if k != "generations"}, indent=2))
    output = args.output or (
        os.path.join(args.checkpoint, f"eval_{args.task}.json") if os.path.isdir(args.checkpoint) else None
    )
    if output:
        with open(output, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    if os.path.isdir(args.checkpoint):  # the model card of a later push shows the last evaluation
        from .hub import write_eval_results

        write_eval_results(args.checkpoint, results_name, result, command)


def _eval_easy_vqa(args: argparse.Namespace, model: Any, processor: Any) -> tuple[dict[str, Any], str, str]:
    """(results, their name on the model card, the command that reproduces them)."""
    from .data import load_easy_vqa
    from .evaluation import evaluate_easy_vqa, progress_bar

    # "describe" asks the same questions as "open" (only the training targets differ): every test question,
    # scored on the word after the model's description (as the quickstart scores itself).
    if args.data is not None:
        raise SystemExit(
            "error: --data applies to scienceqa, mme and mmbench (easy-vqa comes from its package)."
        )
    args.limit = 1000 if args.limit is NO_LIMIT_GIVEN else args.limit
    described = args.prompt_format == "describe"
    questions_format = "open" if described else args.prompt_format
    dataset = load_easy_vqa(args.split or "test", limit=args.limit, prompt_format=questions_format)
    bar, progress = progress_bar("evaluating", len(dataset))
    result = evaluate_easy_vqa(
        model,
        processor,
        dataset,
        batch_size=args.batch_size,
        progress=progress,
        answers_described=described,
    )
    bar.close()
    command = f"mmadapters eval CHECKPOINT --limit {args.limit or 'all'} --prompt-format {args.prompt_format}"
    return result, f"easy-vqa test ({args.prompt_format} answers)", command


def _eval_task(args: argparse.Namespace, model: Any, processor: Any) -> tuple[dict[str, Any], str, str]:
    """ScienceQA, MME or MMBench, with the paper's table: (results, their name on the model card, the command)."""
    from .evaluation import progress_bar
    from .evaluation.tasks import run_task

    bar, progress = progress_bar(f"evaluating {args.task}", unit="prompt")
    limit = None if args.limit is NO_LIMIT_GIVEN else args.limit
    result = run_task(
        args.task, model, processor, args.data, args.split, limit, args.batch_size, progress=progress
    )
    bar.close()
    command = f"mmadapters eval CHECKPOINT --task {args.task}" + (f" --limit {limit}" if limit else "")
    return result, f"{result['dataset']} {result['split']}", command


def _input_lines():
    """Lines of standard input as text; None for a line that is not UTF-8 (reported, the chat goes on)."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # already text (tests, notebooks)
        yield from sys.stdin
        return
    for raw in stream:
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            yield None


def _chat(args: argparse.Namespace) -> None:
    """Terminal chat: `/image PATH` (a file or an http(s) URL) attaches an image to the next question, `/reset` forgets, `/quit` ends."""
    from .evaluation.generate import ContextFullError, answer_length, answer_tokens, chat_inputs
    from .processing import InvalidImageError, load_image

    model, processor = load_for_inference(args.checkpoint, **inference_keywords(args))
    messages: list[dict] = []
    images: list = []
    pending_image = None
    print("Type a question. /image PATH (or URL) attaches an image, /reset starts over, /quit ends.")
    for line in _input_lines():
        if line is None:
            print("error: that line is not UTF-8 text; type it again (check the terminal's encoding).")
            continue
        line = line.strip()
        if not line:
            continue
        command, _, rest = line.partition(" ")
        if command in ("/quit", "/exit"):
            break
        if command == "/reset":
            messages, images, pending_image = [], [], None
            print("(conversation cleared)")
            continue
        if command == "/image":
            path = rest.strip()
            if not path:
                print("error: /image needs a file path or URL: /image PATH")
                continue
            try:
                pending_image = load_image(path, processor.max_image_pixels, what="image")
                print(f"(image {path} attached to the next question)")
            except InvalidImageError as error:
                print(f"error: {error}")
            continue
        # A mistyped command is not sent as a question ("/tmp/x.png ..." is one).
        if re.fullmatch(r"/[A-Za-z]+", command):
            print(f"error: unknown command {command}: /image PATH, /reset or /quit")
            continue
        content = [{"type": "text", "text": line}]
        question_images = images
        if pending_image is not None:
            content.insert(0, {"type": "image"})
            question_images = [*images, pending_image]
        question = [*messages, {"role": "user", "content": content}]
        # As in the demo, a question the chat cannot ask is said and the chat goes on without it.
        try:
            inputs = inputs_on_model_device(chat_inputs(processor, question, question_images), model)
            max_new_tokens = answer_length(model, inputs["input_ids"].shape[1], args.max_new_tokens)
        except ContextFullError as error:
            print(f"{error}: /reset starts over (the question was not asked).")
            continue
        except USER_ERRORS as error:  # e.g. "<image>" typed in the question (transformers < 5.25)
            print(f"error: {error}")
            continue
        messages, images, pending_image = question, question_images, None
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answer = processor.decode(
            answer_tokens(model, inputs["input_ids"], output)[0], skip_special_tokens=True
        )
        answer = answer.strip()
        print(answer, flush=True)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})


def _convert_instructblip(args: argparse.Namespace) -> None:
    from .atomic import check_output_folder
    from .convert import from_instructblip

    check_output_folder(args.output_dir, (args.instructblip, args.llm), args.overwrite)
    model, processor = from_instructblip(args.instructblip, text_model=args.llm)
    model.save_pretrained(args.output_dir, processor=processor)
    taken = ", ".join(model.config.qformer_source["modules"])
    print(
        f"CROME initialised from {args.instructblip} ({taken}) around {args.llm}; saved to {args.output_dir}"
    )


def _convert_lavin(args: argparse.Namespace) -> None:
    from .atomic import check_output_folder
    from .convert.lavin_official import convert_official_lavin

    check_output_folder(args.output_dir, (args.checkpoint, args.llm, args.vision), args.overwrite)
    model, processor, report = convert_official_lavin(
        args.checkpoint, args.llm, args.vision, temperature=args.temperature
    )
    model.save_pretrained(args.output_dir, processor=processor)
    print(report.summary())
    print(f"Converted {args.checkpoint} around {args.llm} and {args.vision}; saved to {args.output_dir}")


def _merge(args: argparse.Namespace) -> None:
    from .convert.merge import merge_checkpoint

    check_checkpoint_name(args.checkpoint)
    out = merge_checkpoint(
        args.checkpoint,
        args.output_dir,
        args.modality,
        text_model=args.llm,
        vision_model=args.vision,
        overwrite=args.overwrite,
    )
    print(
        f"Folded the LLM adapters for {args.modality} samples into a plain transformers LLM: {out} "
        "(load it with AutoModelForCausalLM.from_pretrained; mmadapters is not needed)"
    )


def _upload_options(args: argparse.Namespace) -> dict:
    """The upload flags `push` and `push-space` share (`_add_upload_flags`), as keywords of push_folder/push_space."""
    return dict(
        private=True if args.private else None,
        dry_run=args.dry_run,
        retries=args.retries,
        create_pr=args.create_pr,
        revision=args.revision,
        commit_description=args.commit_description,
    )


def _add_upload_flags(command: argparse.ArgumentParser, repo: str) -> None:
    """The flags of `push` and `push-space` that say how to upload (read back by `_upload_options`)."""
    command.add_argument("--dry-run", action="store_true", help="list the files and sizes; upload nothing")
    command.add_argument("--private", action="store_true", help=f"create the {repo} private")
    command.add_argument("--commit-description", help="the commit's longer description")
    command.add_argument(
        "--create-pr", action="store_true", help="open a pull request instead of committing to the branch"
    )
    command.add_argument("--revision", help="the branch to commit to (default: main)")
    command.add_argument(
        "--retries",
        type=non_negative_int,
        default=4,
        help="retries of transient failures (5xx, network; default: %(default)s)",
    )


def _push(args: argparse.Namespace) -> None:
    from .hub import format_plan, push_folder

    result = push_folder(
        args.folder,
        args.repo_id,
        commit_message=args.commit_message,
        include_backbone_weights=args.include_backbone_weights,
        allow_local_backbones=args.allow_local_backbones,
        tags=args.tags,
        license=args.license,
        **_upload_options(args),
    )
    if args.dry_run:
        print(f"Would upload to {args.repo_id}:\n{format_plan(result)}")
    else:
        print(f"Pushed {args.folder} to {args.repo_id}: {result}")


def _demo(args: argparse.Namespace) -> None:
    app_dir = os.path.join("spaces", args.kind)
    launch_demo(kind=args.kind, app_dir=app_dir if os.path.isdir(app_dir) else None, args=args)


def _push_space(args: argparse.Namespace) -> None:
    from .hub import format_plan, push_space

    result = push_space(args.folder, args.repo_id, model=args.model, **_upload_options(args))
    if args.dry_run:
        print(f"Would upload to the Space {args.repo_id}:\n{format_plan(result)}")
    else:
        print(f"Pushed the Space {args.folder} to {args.repo_id} (model {args.model}): {result}")


def _add_backbone_flag(
    command: argparse.ArgumentParser, role: str, help: str, required: bool = False
) -> None:
    """`--text-model` / `--vision-model` as every command names a backbone; `--llm` / `--vision` (the converters'
    first names) are the same flags."""
    first_name = {"text": "--llm", "vision": "--vision"}[role]
    command.add_argument(
        first_name, f"--{role}-model", dest=first_name.removeprefix("--"), required=required, help=help
    )


def _add_overwrite_flag(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a checkpoint already in the output folder (atomically)",
    )


def version_line() -> str:
    """`mmadapters 0.2.0 (Python 3.11.9, torch 2.13.0, transformers 5.25.0, ...)`: the installed versions, read from
    the package metadata (nothing is imported), "not installed" for an optional one that is not."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    libraries = []
    for name in ("torch", "transformers", "peft", "accelerate", "huggingface_hub", "trl", "bitsandbytes"):
        try:
            libraries.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            libraries.append(f"{name} not installed")
    return f"mmadapters {__version__} (Python {sys.version.split()[0]}, {', '.join(libraries)})"


class PrintVersion(argparse.Action):
    """`--version`: argparse's own version action wraps the line at the terminal's width; this prints it whole."""

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    from .quickstart import QuickstartSettings  # its defaults are the quickstart flags' defaults

    parser = argparse.ArgumentParser(
        prog="mmadapters", description="Multimodal adapters for Hugging Face models."
    )
    parser.add_argument(
        "--version",
        action=PrintVersion,
        nargs=0,
        help="print the versions of mmadapters and of the libraries it runs on (for bug reports), then exit",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    quick = commands.add_parser(
        "quickstart", help="fine-tune LaVIN on easy-vqa on the embedded backbones (offline)"
    )
    quick.add_argument(
        "--output-dir", default="quickstart_output", help="where the checkpoint and summary go"
    )
    quick.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run in the output folder from its last training checkpoint (same flags)",
    )
    add_dataclass_arguments(quick, QuickstartSettings)
    quick.set_defaults(run=_quickstart)

    train = commands.add_parser("train", help="train from a YAML recipe (see recipes/)")
    train.add_argument("recipe", help="the recipe YAML file (see mmadapters/recipes.py and recipes/)")
    train.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="auto|PATH",
        help="continue an interrupted run: from the last complete checkpoint in the output_dir (auto, the default "
        "when the flag has no value) or from the checkpoint folder PATH",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an output_dir that holds an earlier run's checkpoints (they get replaced)",
    )
    train.set_defaults(run=_train)

    evaluate = commands.add_parser(
        "eval", help="evaluate a checkpoint: easy-vqa, ScienceQA, MME or MMBench, with the papers' tables"
    )
    evaluate.add_argument("checkpoint", help="a checkpoint folder or Hub repo id")
    evaluate.add_argument(
        "--task",
        default="easy-vqa",
        choices=["easy-vqa", "scienceqa", "mme", "mmbench"],
        help="the benchmark",
    )
    evaluate.add_argument(
        "--data",
        help="the benchmark's data: a Hub id, or a local copy for offline machines (a folder of parquet files in the "
        "Hub layout, or one parquet file; ScienceQA also in its official layout, the folder with problems.json, "
        "pid_splits.json and images/, as LaVIN's data/); default: the benchmark's Hub repo (not for easy-vqa)",
    )
    evaluate.add_argument("--split", help="default: test (MMBench: dev)")
    evaluate.add_argument("--batch-size", type=positive_int, default=16, help="prompts per generate call")
    evaluate.add_argument(
        "--limit",
        type=limit_or_all,
        default=NO_LIMIT_GIVEN,
        help='evaluate the first N questions, or "all" (default: all; easy-vqa: 1000, as the quickstart)',
    )
    evaluate.add_argument(
        "--output", help="where the JSON results go (default: eval_TASK.json in the checkpoint)"
    )
    evaluate.add_argument(
        "--prompt-format",
        default="open",
        choices=["open", "multiple_choice", "describe"],
        help="easy-vqa only",
    )
    add_inference_arguments(evaluate)
    evaluate.set_defaults(run=_eval)

    chat = commands.add_parser("chat", help="chat with a checkpoint in the terminal (image path + question)")
    chat.add_argument("checkpoint", help="a checkpoint folder or Hub repo id")
    chat.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=64,
        help="longest answer in tokens (default: %(default)s)",
    )
    add_inference_arguments(chat)
    chat.set_defaults(run=_chat)

    convert = commands.add_parser(
        "convert-instructblip", help="initialise CROME from an InstructBLIP checkpoint"
    )
    convert.add_argument("instructblip", help="InstructBLIP checkpoint: Hub id or local folder")
    convert.add_argument("output_dir", help="where the CROME checkpoint goes")
    _add_backbone_flag(convert, "text", "the LLM to put CROME around: Hub id or local folder", required=True)
    _add_overwrite_flag(convert)
    convert.set_defaults(run=_convert_instructblip)

    lavin = commands.add_parser("convert-lavin", help="convert an official LaVIN checkpoint-N.pth")
    lavin.add_argument("checkpoint", help="the official .pth file (adapter tensors, optimizer, args)")
    lavin.add_argument("output_dir", help="where the converted checkpoint goes")
    _add_backbone_flag(lavin, "text", "the LLaMA it was trained on: Hub id or local folder", required=True)
    _add_backbone_flag(
        lavin, "vision", "the CLIP ViT-L/14 it was trained on: Hub id or folder", required=True
    )
    lavin.add_argument(
        "--temperature", type=positive_float, help="router temperature if the checkpoint does not record it"
    )
    _add_overwrite_flag(lavin)
    lavin.set_defaults(run=_convert_lavin)

    push = commands.add_parser("push", help="upload an adapter-only checkpoint folder to the Hub")
    push.add_argument("folder", help="the checkpoint folder (adapter-only, as save_pretrained writes it)")
    push.add_argument("repo_id", help="owner/name on the Hub (created if missing)")
    _add_upload_flags(push, "repo")
    push.add_argument(
        "--commit-message", help="the commit's title (default: Upload adapters with mmadapters)"
    )
    push.add_argument("--tags", nargs="+", help="tags added to the generated model card")
    push.add_argument(
        "--license",
        help="the model card's license (a Hub license id such as apache-2.0); default: the backbones' common license",
    )
    push.add_argument(
        "--include-backbone-weights", action="store_true", help="allow a full checkpoint (backbone weights)"
    )
    push.add_argument(
        "--allow-local-backbones",
        action="store_true",
        help="push even though config.json names a backbone by a path on this machine",
    )
    push.set_defaults(run=_push)

    # The demo's own options (those of `python spaces/lavin/app.py`), so that `mmadapters demo -h` lists them.
    demo = commands.add_parser(
        "demo",
        help="launch the gradio chat locally and print its URL",
        description="Launch the gradio chat locally and print its URL.",
        parents=[build_demo_parser(add_help=False)],
    )
    demo.set_defaults(run=_demo)

    space = commands.add_parser(
        "push-space", help="upload a Space folder (spaces/lavin, spaces/crome) to the Hub"
    )
    space.add_argument("folder", help="the Space folder (spaces/lavin or spaces/crome)")
    space.add_argument("repo_id", help="owner/name of the Space (created if missing)")
    space.add_argument("--model", required=True, help="the model repo the Space serves")
    _add_upload_flags(space, "Space")
    space.set_defaults(run=_push_space)

    merge = commands.add_parser(
        "merge", help="fold LaVIN's LLM adapters for one modality into a plain transformers LLM checkpoint"
    )
    merge.add_argument("checkpoint", help="LaVIN checkpoint: folder or Hub id")
    merge.add_argument("output_dir", help="where the merged LLM goes (a plain transformers checkpoint)")
    merge.add_argument(
        "--modality",
        default="text",
        choices=["text", "image"],
        help="the modality whose routing is folded in (default: %(default)s)",
    )
    _add_backbone_flag(
        merge,
        "text",
        "load the LLM from here instead of the place recorded in the checkpoint (checked against its record)",
    )
    _add_backbone_flag(
        merge,
        "vision",
        "load the vision tower from here instead of the place recorded in the checkpoint (checked against its "
        "record; the merged LLM does not hold it, but the checkpoint loads whole)",
    )
    _add_overwrite_flag(merge)
    merge.set_defaults(run=_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_library_logs()

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        args.run(args)
    # Our errors (all MMAdaptersError) and the ValueError / FileNotFoundError that transformers-style checks raise
    # carry a message that says what to do: one line, not a traceback.
    except (MMAdaptersError, FileNotFoundError, ValueError) as error:
        _print_stop(f"error: {error}", error)
        return 2
    except KeyboardInterrupt as interrupt:  # Ctrl-C: where the progress went, not a traceback
        # On a line of its own: Ctrl-C lands mid-line (in a progress bar).
        _print_stop("\ninterrupted", interrupt)
        return 130
    return 0


def _print_stop(message: str, error: BaseException) -> None:
    """Why a command stopped, and its notes (e.g. where a stopped training run saved its progress)."""
    print(message, file=sys.stderr)
    for note in getattr(error, "__notes__", []):
        print(note, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
