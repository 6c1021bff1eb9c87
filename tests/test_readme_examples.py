"""The README's Python examples run as written: each block runs in its own process against a local Hub server
(tests/hub_server.py) that holds tiny random stand-ins at the Hub ids the README names (meta-llama/Llama-2-7b-hf,
openai/clip-vit-large-patch14, Salesforce/instructblip-vicuna-7b, lmsys/vicuna-7b-v1.5, the `you/...` LoRAs and
checkpoints), with the licenses of the real repos. The code is the README's, character for character, except the
sizes of the training example (steps, batch, data limits), scaled down for the test."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_bare_llm_lora, save_image, save_tiny_instructblip, save_tiny_llm, save_tiny_vision
from hub_server import HubServer, client_env, upload_plain, with_license

from mmadapters.checkpoint_files import ADAPTER_WEIGHTS_NAME

README = Path(__file__).resolve().parent.parent / "README.md"
TOKEN = "hf_readme_examples_token_0123456789"
LLAMA, CLIP = "meta-llama/Llama-2-7b-hf", "openai/clip-vit-large-patch14"


def readme_block(containing: str) -> str:
    """The one ```python block of the README that contains `containing`."""
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)
    found = [block for block in blocks if containing in block]
    assert len(found) == 1, f"{len(found)} README python blocks contain {containing!r}"
    return found[0]


def scaled(code: str, replacements: dict[str, str]) -> str:
    """`code` with each size replaced; each must be there exactly once (a README edit that moves one fails here)."""
    for old, new in replacements.items():
        assert code.count(old) == 1, f"{old!r} is not in the README block once"
        code = code.replace(old, new)
    return code


@pytest.fixture(scope="module")
def readme_hub(tmp_path_factory):
    """The local Hub with the README's repos; yields (server, working folder holding photo.jpg)."""
    import huggingface_hub.constants

    root = tmp_path_factory.mktemp("readme_hub")
    saved = huggingface_hub.constants.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = False  # the uploads below talk to the local server
    server = HubServer(token=TOKEN).start()
    try:
        llm, vision = save_tiny_llm(root / "llm"), save_tiny_vision(root / "vision")
        upload_plain(server, LLAMA, with_license(llm, root / "llama-card", "llama2"))
        upload_plain(server, CLIP, with_license(vision, root / "clip-card", "mit"))
        upload_plain(server, "lmsys/vicuna-7b-v1.5", with_license(llm, root / "vicuna-card", "llama2"))
        upload_plain(
            server, "Salesforce/instructblip-vicuna-7b", save_tiny_instructblip(root / "instructblip")
        )
        for seed, name in enumerate(("chat", "code")):
            lora = save_bare_llm_lora(llm, root / name, seed, base_model=LLAMA, r=8, lora_alpha=16)
            upload_plain(server, f"you/llama-2-7b-{name}-lora", lora)
        work = root / "work"
        work.mkdir()
        shutil.copy(save_image(root, "photo.jpg", (200, 30, 30)), work / "photo.jpg")
        yield server, work
    finally:  # the rest of the suite runs offline, also when a setup step above failed
        huggingface_hub.constants.HF_HUB_OFFLINE = saved
        server.stop()


def run_readme_code(readme_hub, code: str) -> subprocess.CompletedProcess:
    server, work = readme_hub
    ran = subprocess.run(
        [sys.executable, "-c", code],
        cwd=work,
        env=client_env(server, work.parent / "hf_home"),
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert ran.returncode == 0, ran.stderr[-4000:]
    return ran


# Block "Using it": builds LaVIN around Hub backbones, renders the chat, answers about photo.jpg. Then the training
# and sharing blocks go on with its `model` and `processor`, as a reader does.
USING_IT = "adapter_config=MMAdapterConfig(temperature=10.0)"
TRAINING = "trainer = LavinTrainer("
SHARING = 'model.push_to_hub("you/lavin-easy-vqa"'


def test_the_first_example_then_training_then_sharing_run_as_written(readme_hub):
    training = scaled(
        readme_block(TRAINING),
        {
            "limit=4800": "limit=8",
            "max_steps=150": "max_steps=2",
            "per_device_train_batch_size=32": "per_device_train_batch_size=4",
            "limit=1000": "limit=4",
        },
    )
    code = "\n".join([readme_block(USING_IT), training, readme_block(SHARING), "print(type(model).__name__)"])
    ran = run_readme_code(readme_hub, code)
    accuracy, by_group = ran.stdout.splitlines()[-2].split(" ", 1)  # evaluate_easy_vqa's result was printed
    assert 0 <= float(accuracy) <= 1 and "'yes/no'" in by_group
    assert ran.stdout.rstrip().endswith(
        "LavinForConditionalGeneration"
    )  # the Auto class loaded the pushed repo
    server, _ = readme_hub
    pushed = server.repos["you/lavin-easy-vqa"].commits[-1][1]
    assert ADAPTER_WEIGHTS_NAME in pushed and "model.safetensors" not in pushed, sorted(
        pushed
    )  # adapter-only
    assert b"license: llama2" in pushed["README.md"]


def test_the_loading_examples_run_as_written(readme_hub):
    push_checkpoint = (
        "from mmadapters import LavinForConditionalGeneration, LavinProcessor\n"
        f"model = LavinForConditionalGeneration.from_backbones({LLAMA!r}, {CLIP!r})\n"
        f"processor = LavinProcessor.from_backbones({LLAMA!r}, {CLIP!r})\n"
        'model.push_to_hub("you/lavin-scienceqa", processor=processor, license="llama2")\n'
    )
    run_readme_code(readme_hub, push_checkpoint)
    ran = run_readme_code(readme_hub, readme_block('device_map="auto", max_memory='))
    assert "{" in ran.stdout  # hf_device_map was printed


def test_the_peft_examples_run_as_written(readme_hub):
    run_readme_code(readme_hub, readme_block("mmadapters.add_lora(model"))


def test_the_crome_example_runs_as_written(readme_hub):
    ran = run_readme_code(readme_hub, readme_block("from_instructblip(") + "\nprint(loss.item())")
    assert math.isfinite(float(ran.stdout.split()[-1]))  # the training batch gave a loss


def readme_command_lines() -> list[str]:
    """Every `mmadapters ...` command of the README: the lines of its bash blocks (comments taken off) and the inline
    ones in backticks."""
    text = README.read_text()
    lines = [
        line.split("  #")[0]
        for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)
        for line in block.splitlines()
        if line.startswith("mmadapters ")
    ]
    lines += re.findall(r"`(mmadapters [^`]*)`", text)
    return sorted({" ".join(line.split()) for line in lines})


def command_flags(command: str) -> set[str]:
    """The option strings of `mmadapters COMMAND` (argparse would also take a prefix of one: the README may not)."""
    from mmadapters.cli import build_parser

    parser = build_parser()._subparsers._group_actions[0].choices[command]
    return {option for action in parser._actions for option in action.option_strings}


def test_every_command_line_of_the_readme_parses():
    import shlex

    from mmadapters.cli import build_parser

    lines = readme_command_lines()
    assert len(lines) > 20, lines
    commands = build_parser()._subparsers._group_actions[0].choices
    # The quickstart's synopsis: "[--llm-routing modality|learned]", "[--[no-]bf16]": each flag it names must exist.
    synopsis = [line for line in lines if "[--[no-]" in line]
    assert len(synopsis) == 1 and synopsis[0].startswith("mmadapters quickstart ["), synopsis
    named = set()
    for flag in re.findall(r"--(?:\[no-\])?[a-z0-9-]+", synopsis[0]):
        named |= {flag.replace("[no-]", ""), flag.replace("[no-]", "no-")} if "[no-]" in flag else {flag}
    unknown = named - command_flags("quickstart")
    assert not unknown, f"the README names unknown quickstart flags: {unknown}"
    assert len(named) > 15
    for line in set(lines) - set(synopsis):
        line = re.sub(r"\[(--[^\]]*)\]", r"\1", line)  # "[--private]": an optional flag
        words = shlex.split(re.sub(r"([\w.-]+)(\|[\w.-]+)+", r"\1", line))[1:]  # "open|describe": one of them
        if len(words) == 1 and not words[0].startswith(
            "-"
        ):  # a command named in a sentence: "`mmadapters push`"
            assert words[0] in commands, line
            continue
        if words[0] in commands:
            unknown = {word.split("=")[0] for word in words if word.startswith("--")} - command_flags(
                words[0]
            )
            assert not unknown, f"the README's `{line}` names unknown flags: {unknown}"
        try:
            build_parser().parse_args(words)
        except SystemExit as stop:  # -h and --version print and exit 0; an unknown flag exits 2
            assert stop.code == 0, f"the README's `{line}` does not parse"
