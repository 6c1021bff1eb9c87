"""The gradio Spaces (issue: gradio Spaces): a real launch driven by `gradio_client` and by headless Chromium,
the chat function on multi-turn histories, limits and errors, and pushing a Space to the test Hub server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from hub_server import HubServer
from PIL import Image

from mmadapters import LavinForConditionalGeneration, LavinProcessor
from mmadapters.demo import DemoLimits, build_conversation, make_chat_fn, resolve_model_name
from mmadapters.hub import push_space
from mmadapters.processing import InvalidImageError, load_image
from mmadapters.processing.base import takes_sanitized_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "spaces", "lavin", "examples", "red_triangle.png")
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def checkpoint(tiny_backbones, tmp_path_factory):
    torch.manual_seed(0)
    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones).eval()
    folder = tmp_path_factory.mktemp("demo") / "lavin"
    model.save_pretrained(folder, processor=LavinProcessor.from_backbones(*tiny_backbones))
    return str(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(checkpoint):
    """`mmadapters demo CHECKPOINT --port P` in its own process, as a user starts it; yields its URL."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "mmadapters.cli", "demo", checkpoint, "--port", str(port), "--timeout", "30"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url, lines, deadline = None, [], time.time() + 120
    while time.time() < deadline and url is None:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line)
        if "running on http" in line:
            url = line.rsplit(" ", 1)[-1].strip()
    if url is None:
        process.kill()
        pytest.fail("the demo did not start:\n" + "".join(lines[-40:]))
    assert url == f"http://127.0.0.1:{port}/"
    yield url
    process.terminate()
    process.wait(timeout=30)


def test_client_image_question_streams_text_turn_and_bad_file(app, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(app, verbose=False)
    job = client.submit(
        {"text": "what color is the shape?", "files": [handle_file(EXAMPLE)]}, 40, 0.0, 0.9, api_name="/chat"
    )
    job.result(timeout=120)
    outputs = [o for o in job.outputs() if o]
    assert len(outputs) > 1, "the answer was not streamed"
    assert all(b.startswith(a) for a, b in zip(outputs, outputs[1:], strict=False))  # a growing answer
    assert not outputs[-1].startswith("⚠️")

    text_only = client.predict(
        {"text": "the capital of france is", "files": []}, 8, 0.0, 0.9, api_name="/chat"
    )
    assert text_only and not text_only.startswith("⚠️")

    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    message = client.predict(
        {"text": "what is this?", "files": [handle_file(str(corrupt))]}, 8, 0.0, 0.9, api_name="/chat"
    )
    assert message.startswith("⚠️") and "not a readable image" in message and "Traceback" not in message
    # The app keeps serving.
    again = client.predict(
        {"text": "what shape?", "files": [handle_file(EXAMPLE)]}, 8, 0.0, 0.9, api_name="/chat"
    )
    assert again and not again.startswith("⚠️")


def test_browser_uploads_an_image_and_sees_the_answer(app, tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("MMADAPTERS_REQUIRE_BROWSER"):
            pytest.fail("chromium and chromedriver are required (Debian packages chromium, chromium-driver)")
        pytest.skip("chromium/chromedriver not installed (`make test` installs them when it can)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_window_size(1200, 900)
        driver.get(app)
        wait = WebDriverWait(driver, 60)
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[data-testid=file-upload]"))
        upload.send_keys(EXAMPLE)
        wait.until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "[data-testid=textbox] img, .thumbnail-item, img")
        )
        driver.find_element(By.CSS_SELECTOR, "textarea[data-testid=textbox]").send_keys(
            "what color is the shape?"
        )
        driver.find_element(By.CSS_SELECTOR, "button[data-testid=submit-button]").click()
        answer = wait.until(
            lambda d: [
                e.text for e in d.find_elements(By.CSS_SELECTOR, "[data-testid=bot]") if e.text.strip()
            ]
        )
        time.sleep(1.0)  # let the stream finish rendering before the screenshot
        screenshot = tmp_path / "demo_answer.png"
        driver.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 10_000
        assert answer and not answer[0].startswith("⚠️")
        users = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "[data-testid=user]")]
        assert any("what color is the shape?" in text for text in users)
        print(f"screenshot: {screenshot}")
    finally:
        driver.quit()


class RecordingProcessor:
    """Wraps a processor and keeps the model inputs the chat function built with it (by the chat template and a
    processor call, or by a tokenized chat template: transformers >= 5.25, the typed text sanitized)."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.calls = []

    def apply_chat_template(self, messages, **kwargs):
        outputs = self.processor.apply_chat_template(messages, **kwargs)
        if kwargs.get("tokenize"):
            self.calls.append({"messages": messages, "kwargs": kwargs, "outputs": outputs})
        return outputs

    def __call__(self, images=None, text=None):
        outputs = self.processor(images=images, text=text)
        self.calls.append({"images": images, "text": text, "outputs": outputs})
        return outputs


def recorded_chat(checkpoint, tmp_path):
    """The demo's chat function on the checkpoint, its processor wrapped in a RecordingProcessor, and a blue image."""
    model = LavinForConditionalGeneration.from_pretrained(checkpoint)
    processor = LavinProcessor.from_pretrained(checkpoint)
    recorder = RecordingProcessor(processor)
    blue = tmp_path / "blue.png"
    Image.new("RGB", (40, 30), (0, 0, 255)).save(blue)
    return processor, recorder, make_chat_fn(model, recorder, DemoLimits(max_new_tokens=4)), blue


@pytest.mark.parametrize("style", ["typed", "path-dict", "tuple"])
def test_multi_turn_history_with_an_image_reaches_the_model(checkpoint, tmp_path, style):
    processor, recorder, chat, blue = recorded_chat(checkpoint, tmp_path)
    image_part = {
        "typed": {"type": "file", "file": {"path": str(blue)}},
        "path-dict": {"path": str(blue)},
        "tuple": (str(blue),),
    }[style]
    text_part = {"type": "text", "text": "what color?"} if style == "typed" else "what color?"
    history = [
        {"role": "user", "content": [image_part]}
        if style != "typed"
        else {"role": "user", "content": [image_part, text_part]},
        *([{"role": "user", "content": text_part}] if style != "typed" else []),
        {"role": "assistant", "content": [{"type": "text", "text": "blue"}] if style == "typed" else "blue"},
        {
            "role": "user",
            "content": "tell me a fact" if style != "typed" else [{"type": "text", "text": "tell me a fact"}],
        },
        {"role": "assistant", "content": "ok"},
    ]
    answers = list(chat({"text": "and which shape?", "files": []}, history, 4, 0.0, 0.9))
    assert answers and not answers[-1].startswith("⚠️")

    call = recorder.calls[-1]
    expected_messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "blue"}]},
        {"role": "user", "content": [{"type": "text", "text": "tell me a fact"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
        {"role": "user", "content": [{"type": "text", "text": "and which shape?"}]},
    ]
    prompt = processor.apply_chat_template(expected_messages, add_generation_prompt=True)
    assert prompt.count("<image>") == 1 and "Image: <image>" in prompt
    if (
        takes_sanitized_text()
    ):  # the typed text encoded as text: the same inputs, as no control token was typed
        assert call["kwargs"]["sanitize_control_tokens"] is True
    else:
        assert call["text"] == prompt
    expected = processor(images=[load_image(str(blue))], text=prompt)
    assert torch.equal(call["outputs"]["pixel_values"], expected["pixel_values"])
    assert torch.equal(call["outputs"]["input_ids"], expected["input_ids"])


def test_control_tokens_typed_into_the_demo_are_text(checkpoint, tmp_path):
    """A `<image>` typed into a question asked for a second image ("⚠️ ... placeholder"), and a typed `</s>` ended
    the user's turn. With transformers >= 5.25 the typed text is sanitized: the question is answered, the inputs
    hold the uploaded image's tokens only, and the typed `</s>` is text."""
    processor, recorder, chat, blue = recorded_chat(checkpoint, tmp_path)
    question = "is <image> or </s> here?"
    answers = list(chat({"text": question, "files": [str(blue)]}, [], 4, 0.0, 0.9))
    if not takes_sanitized_text():
        assert answers[-1].startswith("⚠️") and "placeholder" in answers[-1]
        return
    assert answers and not answers[-1].startswith("⚠️")
    ids = recorder.calls[-1]["outputs"]["input_ids"][0]
    assert int((ids == processor.image_token_id).sum()) == processor.num_image_tokens
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert int((ids == processor.tokenizer.eos_token_id).sum()) == prompt.count("</s>") - 1


def test_limits_and_user_errors(checkpoint, tmp_path):
    model = LavinForConditionalGeneration.from_pretrained(checkpoint)
    processor = LavinProcessor.from_pretrained(checkpoint)
    chat = make_chat_fn(model, processor, DemoLimits(max_image_pixels=32 * 32, max_new_tokens=3))
    big = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(big)
    message = list(chat({"text": "what?", "files": [str(big)]}, [], 3))
    assert message[-1].startswith("⚠️") and "pixels" in message[-1]
    small = tmp_path / "small.png"
    Image.new("RGB", (16, 16)).save(small)
    assert list(chat({"text": "", "files": [str(small)]}, [], 3))[-1].startswith("⚠️ Type a question")
    # max_new_tokens is capped by the limit, whatever the request asks for.
    recorded = []
    original = model.generate
    model.generate = lambda **kwargs: recorded.append(kwargs["max_new_tokens"]) or original(**kwargs)
    list(chat({"text": "hello", "files": []}, [], 10_000))
    assert recorded == [3]


def test_conversation_rejects_unknown_files(tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello")
    with pytest.raises(Exception, match="not a readable image"):
        build_conversation({"text": "read this", "files": [str(text_file)]}, [], 10**6)
    # An upload is a file on the server: a URL sent as a file name is not fetched (the server requests nothing).
    with pytest.raises(InvalidImageError, match="does not exist or is not a file"):
        build_conversation({"text": "look", "files": ["http://127.0.0.1:9/secret.png"]}, [], 10**6)


def test_model_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("MMADAPTERS_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_name(None) is None  # -> embedded backbones
    (tmp_path / "quickstart_output" / "checkpoint").mkdir(parents=True)
    (tmp_path / "quickstart_output" / "checkpoint" / "config.json").write_text("{}")
    assert resolve_model_name(None).endswith(os.path.join("quickstart_output", "checkpoint"))
    space = tmp_path / "space"
    space.mkdir()
    (space / "mmadapters_space.json").write_text(json.dumps({"model": "org/lavin"}))
    assert resolve_model_name(None, str(space)) == "org/lavin"
    monkeypatch.setenv("MMADAPTERS_MODEL", "org/from-env")
    assert resolve_model_name(None, str(space)) == "org/from-env"
    assert resolve_model_name("org/explicit", str(space)) == "org/explicit"


def test_push_space(tmp_path, local_hub_online):
    server = HubServer(token="hf_space_token_123456").start()
    try:
        planned = push_space(
            os.path.join(REPO, "spaces", "lavin"), "org/lavin-space", model="org/lavin", dry_run=True
        )
        assert {"app.py", "requirements.txt", "README.md", "mmadapters_space.json"} <= {
            f.path for f in planned
        }
        assert server.requests == []
        push_space(
            os.path.join(REPO, "spaces", "lavin"),
            "org/lavin-space",
            model="org/lavin",
            token="hf_space_token_123456",
            endpoint=server.url,
        )
        files = server.spaces["org/lavin-space"].commits[-1][1]
        assert json.loads(files["mmadapters_space.json"]) == {"model": "org/lavin"}
        readme = files["README.md"].decode()
        assert "sdk: gradio" in readme and "models:\n- org/lavin" in readme
        assert "examples/red_triangle.png" in files and "app.py" in files
        assert "org/lavin-space" not in server.repos  # a Space, not a model repo
        assert files["requirements.txt"].decode().splitlines()[-1] == "mmadapters[demo]>=0.2"

        # A model trained on quantised backbones (LaVIN-lite) needs bitsandbytes in the Space: the quant extra.
        from huggingface_hub import HfApi

        api = HfApi(endpoint=server.url, token="hf_space_token_123456")
        api.create_repo("org/lite")
        config = json.dumps(
            {"model_type": "lavin", "backbone_quantization": {"text_config": {"load_in_4bit": True}}}
        )
        api.upload_file(path_or_fileobj=config.encode(), path_in_repo="config.json", repo_id="org/lite")
        push_space(
            os.path.join(REPO, "spaces", "lavin"),
            "org/lite-space",
            model="org/lite",
            token="hf_space_token_123456",
            endpoint=server.url,
        )
        files = server.spaces["org/lite-space"].commits[-1][1]
        assert files["requirements.txt"].decode().splitlines()[-1] == "mmadapters[demo,quant]>=0.2"
    finally:
        server.stop()


def test_push_space_command(monkeypatch, capsys):
    """`mmadapters push-space`: the plan with --dry-run; the commit flags it shares with `push` reach the Hub."""
    import huggingface_hub
    from huggingface_hub import CommitInfo, HfApi, RepoUrl

    from mmadapters.cli import main

    folder = os.path.join(REPO, "spaces", "lavin")
    assert main(["push-space", folder, "org/space", "--model", "org/lavin", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Would upload to the Space org/space" in out and "mmadapters_space.json" in out
    seen = {}

    def create_repo(self, repo_id, **kwargs):
        seen["create_repo"] = (repo_id, kwargs)
        return RepoUrl(f"https://huggingface.co/spaces/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        seen["commit"] = (repo_id, kwargs)
        seen["files"] = {op.path_in_repo for op in operations}
        return CommitInfo(
            commit_url="https://huggingface.co/spaces/org/space/commit/1111",
            commit_message=kwargs["commit_message"],
            commit_description="",
            oid="1" * 40,
            pr_url="https://huggingface.co/spaces/org/space/discussions/1",
        )

    def create_branch(self, repo_id, **kwargs):
        seen["branch"] = (repo_id, kwargs)

    def no_model_config(
        *args, **kwargs
    ):  # push-space reads the model's config.json (LaVIN-lite needs bitsandbytes)
        raise OSError("offline")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_model_config)
    flags = ["--private", "--create-pr", "--revision", "dev", "--commit-description", "why", "--retries", "0"]
    assert main(["push-space", folder, "org/space", "--model", "org/lavin", *flags]) == 0
    assert seen["create_repo"] == (
        "org/space",
        {"exist_ok": True, "private": True, "repo_type": "space", "space_sdk": "gradio"},
    )
    repo_id, commit = seen["commit"]
    assert repo_id == "org/space" and commit["repo_type"] == "space"
    assert (commit["create_pr"], commit["revision"], commit["commit_description"]) == (True, "dev", "why")
    assert seen["branch"] == ("org/space", {"branch": "dev", "repo_type": "space", "exist_ok": True})
    assert {"app.py", "README.md", "mmadapters_space.json"} <= seen["files"]
    assert "discussions/1" in capsys.readouterr().out


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["lavin", "crome"])
def test_spaces_default_to_the_embedded_backbones(kind, monkeypatch, tmp_path):
    """Without a model, each Space serves its method around the real embedded SmolLM2 and answers."""
    from mmadapters.demo import build_demo, load_demo_model

    monkeypatch.delenv("MMADAPTERS_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)  # no quickstart checkpoint here
    # A copy of the Space in a checkout without quickstart_output/ (the repo's own may hold one after
    # `make quickstart`, which the app would then serve, rightly).
    app_dir = str(tmp_path / "checkout" / "spaces" / kind)
    shutil.copytree(os.path.join(REPO, "spaces", kind), app_dir)
    assert resolve_model_name(None, app_dir) is None
    model, processor, description = load_demo_model(None, kind)
    assert model.config.model_type == kind and "embedded" in description
    chat = make_chat_fn(model, processor, DemoLimits())
    answer = list(chat({"text": "What is the capital of France?", "files": []}, [], 12))[-1]
    assert "Paris" in answer  # untrained adapters start as the identity: the LLM's own answer
    image_answer = list(chat({"text": "What shape is in the image?", "files": [EXAMPLE]}, [], 8))[-1]
    assert image_answer.strip() and not image_answer.startswith("⚠️")
    demo = build_demo(model, processor, description, kind, DemoLimits(), os.path.join(app_dir, "examples"))
    assert len(demo.examples) == 4  # three easy-vqa images and a text-only question


def test_generation_timeout_stops_and_says_so(checkpoint):
    model = LavinForConditionalGeneration.from_pretrained(checkpoint)
    processor = LavinProcessor.from_pretrained(checkpoint)
    model.language_model.register_forward_pre_hook(lambda *_: time.sleep(0.05))  # a slow model
    chat = make_chat_fn(model, processor, DemoLimits(timeout_s=0.2, max_new_tokens=200))
    answers = list(chat({"text": "the capital of", "files": []}, [], 200))
    assert "generation time limit was reached" in answers[-1]
    assert len(processor.tokenizer(answers[-2])["input_ids"]) < 50  # stopped long before 200 tokens


def test_eight_concurrent_clients_with_mixed_requests_are_all_answered(app):
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client, handle_file

    def ask(index: int) -> str:
        client = Client(app, verbose=False)
        files = [handle_file(EXAMPLE)] if index % 2 else []
        text = "what color is the shape?" if index % 2 else "the capital of france is"
        return client.predict({"text": text, "files": files}, 4, 0.0, 0.9, api_name="/chat")

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert len(answers) == 8
    assert all(answer and not answer.startswith("⚠️") for answer in answers), answers


def test_a_conversation_longer_than_the_context_is_refused_at_once(checkpoint):
    model = LavinForConditionalGeneration.from_pretrained(checkpoint)
    processor = LavinProcessor.from_pretrained(checkpoint)
    chat = make_chat_fn(model, processor, DemoLimits(max_new_tokens=64))
    calls = []
    model.generate = lambda **kwargs: calls.append(kwargs)  # must not be reached
    long_text = " ".join(["the capital of france is paris"] * 80)  # far past the tiny LLM's 256 positions
    message = list(chat({"text": long_text, "files": []}, [], 64))
    assert message[-1].startswith("⚠️") and "fills the model's context" in message[-1]
    assert calls == []


def test_demo_on_a_taken_port_is_a_clear_error_before_loading(checkpoint, monkeypatch, capsys):
    import mmadapters.demo as demo
    from mmadapters.cli import main

    monkeypatch.setattr(demo, "load_demo_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["demo", checkpoint, "--port", str(port)]) == 2
    assert f"Port {port} on 127.0.0.1 is in use" in capsys.readouterr().err


def test_backbones_from_flags_or_a_space_setting(tiny_backbones, monkeypatch):
    """`--text-model` / `--vision-model` (or MMADAPTERS_TEXT_MODEL / MMADAPTERS_VISION_MODEL, a Space's settings)
    reach the model: without a checkpoint they replace the embedded backbones of the fresh model."""
    from mmadapters.demo import load_demo_model, parse_args

    text_model, vision_model = tiny_backbones
    monkeypatch.setenv("MMADAPTERS_TEXT_MODEL", text_model)
    monkeypatch.setenv("MMADAPTERS_VISION_MODEL", "from-env")
    args = parse_args(["--vision-model", vision_model], "lavin")
    assert (args.text_model, args.vision_model) == (text_model, vision_model)  # a flag wins over the setting
    model, _, description = load_demo_model(
        None, "lavin", text_model=args.text_model, vision_model=args.vision_model
    )
    assert model.config.text_backbone["name_or_path"] == text_model and text_model in description


def test_the_spaces_require_the_mmadapters_release_their_files_belong_to():
    # A Space installs mmadapters from PyPI: an older release cannot read this release's checkpoints
    # (mmadapters_model.safetensors, from 0.2) nor run its app.py; bumping the version bumps the floor.
    import mmadapters

    release = ".".join(mmadapters.__version__.split(".")[:2])
    for kind in ("lavin", "crome"):
        with open(os.path.join(REPO, "spaces", kind, "requirements.txt")) as f:
            requirement = [line for line in f.read().splitlines() if line.startswith("mmadapters")]
        assert requirement == [f"mmadapters[demo]>={release}"], (kind, requirement)
