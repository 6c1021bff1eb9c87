"""Hub push and pull against a local Hub-compatible server (issue: Hub sharing and conversion, items 1-3).

The real `huggingface_hub` client talks to `tests/hub_server.py` on 127.0.0.1. The round trip runs each side in
its own process pointed at the server with HF_ENDPOINT, as a user on another machine would.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import save_tiny_llm, write_recipe
from hub_server import HubServer, client_env, upload_plain, with_license
from huggingface_hub import HfApi
from safetensors.torch import load_file

from mmadapters import LavinForConditionalGeneration, LavinProcessor
from mmadapters.hub import PushError, build_model_card, push_folder, write_eval_results

TOKEN = "hf_test_secret_token_0123456789"


@pytest.fixture()
def hub(local_hub_online):
    server = HubServer(token=TOKEN).start()
    yield server
    server.stop()


def hub_env(server: HubServer, tmp_path) -> dict:
    return client_env(server, tmp_path / "hf_home")


BUILD_AND_SAVE = """
import sys, torch
from conftest import tiny_sample_inputs
from mmadapters import LavinForConditionalGeneration, LavinProcessor
folder, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = LavinForConditionalGeneration.from_backbones("org/tiny-llm", "org/tiny-vision").eval()
generator = torch.Generator().manual_seed(1)
with torch.no_grad():
    for name, p in model.named_parameters():
        if p.requires_grad and "expert" in name:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
processor = LavinProcessor.from_backbones("org/tiny-llm", "org/tiny-vision")
model.save_pretrained(folder, processor=processor)
with torch.no_grad():
    torch.save(model(**tiny_sample_inputs(processor)).logits, out)
"""

LOAD_FROM_HUB = """
import sys, json, torch
import mmadapters
from conftest import tiny_sample_inputs
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1])
processor = AutoProcessor.from_pretrained(sys.argv[1])
with torch.no_grad():
    torch.save(model(**tiny_sample_inputs(processor)).logits, sys.argv[2])
# The pipeline loads the same repo through the Auto classes and answers with the same tokens.
from transformers import pipeline
pipe = pipeline("image-text-to-text", model=sys.argv[1])
messages = [{"role": "user", "content": [{"type": "text", "text": "the capital of"}]}]
answer = pipe(text=messages, max_new_tokens=4, generate_kwargs={"do_sample": False}, return_full_text=False)[0]["generated_text"]
inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True))
direct = model.generate(**inputs, max_new_tokens=4, do_sample=False)
assert answer == processor.decode(direct[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
print(json.dumps({"class": type(model).__name__, "text_revision": model.config.text_backbone["revision"]}))
"""


def run(script: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, check=False
    )


def test_push_then_pull_in_another_process_gives_identical_logits(hub, tiny_backbones, tmp_path):
    llm_commit = upload_plain(hub, "org/tiny-llm", tiny_backbones[0])
    upload_plain(hub, "org/tiny-vision", tiny_backbones[1])
    env = hub_env(hub, tmp_path)

    folder, expected_file = tmp_path / "lavin", tmp_path / "expected.pt"
    built = run(BUILD_AND_SAVE, str(folder), str(expected_file), env=env)
    assert built.returncode == 0, built.stderr[-3000:]
    config = json.loads((folder / "config.json").read_text())
    assert config["text_backbone"]["revision"] == llm_commit  # Hub backbones are pinned to the loaded commit

    pushed = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmadapters.cli",
            "push",
            str(folder),
            "org/lavin-tiny",
            "--allow-local-backbones",
            "--license",
            "apache-2.0",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    assert TOKEN not in pushed.stdout + pushed.stderr
    files = hub.repos["org/lavin-tiny"].commits[-1][1]
    assert {"config.json", "mmadapters_model.safetensors", "README.md"} <= set(files)
    assert not any(name.startswith("model") and name.endswith(".safetensors") for name in files)

    # The LLM repo moves on; the adapters stay pinned to the commit they were trained on.
    other = save_tiny_llm(tmp_path / "llm-v2", seed=5)
    upload_plain(hub, "org/tiny-llm", other)

    got_file = tmp_path / "got.pt"
    loaded = run(LOAD_FROM_HUB, "org/lavin-tiny", str(got_file), env=env)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    info = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert info == {"class": "LavinForConditionalGeneration", "text_revision": llm_commit}
    assert torch.equal(torch.load(got_file), torch.load(expected_file))


PEFT_ON_TOP_OF_A_HUB_CHECKPOINT = """
import sys, torch
from conftest import tiny_sample_inputs
from peft import LoraConfig, get_peft_model
from mmadapters import LavinForConditionalGeneration, LavinProcessor
out = sys.argv[1]
model = LavinForConditionalGeneration.from_pretrained("org/lavin-tiny")
assert model.name_or_path == "org/lavin-tiny", model.name_or_path
config = LoraConfig(r=2, target_modules=r".*language_model.*\\.q_proj", init_lora_weights=False)
peft_model = get_peft_model(model, config).eval()
peft_model.push_to_hub("org/lavin-tiny-lora")
with torch.no_grad():
    torch.save(peft_model(**tiny_sample_inputs(LavinProcessor.from_pretrained("org/lavin-tiny"))).logits, out)
"""

LOAD_PEFT_ADAPTER_FROM_HUB = """
import sys, torch
import mmadapters
from conftest import tiny_sample_inputs
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained("org/lavin-tiny-lora").eval()
assert model.active_adapters() == ["default"]
with torch.no_grad():
    torch.save(model(**tiny_sample_inputs(AutoProcessor.from_pretrained("org/lavin-tiny"))).logits, sys.argv[1])
"""


def test_a_peft_adapter_pushed_on_top_of_a_hub_checkpoint_loads_with_it(hub, tiny_backbones, tmp_path):
    """PEFT records the Hub checkpoint (the name it was loaded by) as the adapter's base model, so transformers'
    Auto class loads the adapter repo as that checkpoint with the adapter on it, in a fresh process."""
    upload_plain(hub, "org/tiny-llm", tiny_backbones[0])
    upload_plain(hub, "org/tiny-vision", tiny_backbones[1])
    env = hub_env(hub, tmp_path)
    built = run(BUILD_AND_SAVE, str(tmp_path / "lavin"), str(tmp_path / "base.pt"), env=env)
    assert built.returncode == 0, built.stderr[-3000:]
    push_folder(tmp_path / "lavin", "org/lavin-tiny", token=TOKEN, endpoint=hub.url, license="apache-2.0")
    trained = run(PEFT_ON_TOP_OF_A_HUB_CHECKPOINT, str(tmp_path / "expected.pt"), env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    adapter_config = json.loads(hub.repos["org/lavin-tiny-lora"].commits[-1][1]["adapter_config.json"])
    assert adapter_config["base_model_name_or_path"] == "org/lavin-tiny"
    loaded = run(LOAD_PEFT_ADAPTER_FROM_HUB, str(tmp_path / "got.pt"), env=env)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    expected = torch.load(tmp_path / "expected.pt")
    assert torch.equal(torch.load(tmp_path / "got.pt"), expected)
    assert not torch.equal(torch.load(tmp_path / "base.pt"), expected)  # the LoRA changed the model


LOAD_ADAPTER_FROM_A_SUBFOLDER = """
import os, sys
from mmadapters import LavinForConditionalGeneration
llm, vision, cache = sys.argv[1:4]
model = LavinForConditionalGeneration.from_backbones(llm, vision)
where = {"subfolder": "style", "cache_dir": cache}
model.load_adapter("org/loras", adapter_kwargs=where)
assert any(name == "adapter_model.safetensors" for _, _, names in os.walk(cache) for name in names), "cache_dir"
try:  # nothing in this cache, and local_files_only: no download
    model.load_adapter("org/loras", "b", adapter_kwargs={**where, "cache_dir": cache + "-empty"}, local_files_only=True)
except Exception as error:
    print("refused:", type(error).__name__)
else:
    raise SystemExit("local_files_only was not passed on")
model.load_adapter("org/loras", "c", adapter_kwargs={**where, "local_files_only": True})  # from the cache
print(sorted(model.config.peft_adapters))
"""


def test_load_adapter_takes_transformers_download_keywords(hub, tiny_backbones, tmp_path):
    """One of several adapters in a Hub repo (`subfolder`), downloaded into `cache_dir`, and `local_files_only`
    (as a keyword and in adapter_kwargs) reading the cache only, as transformers' load_adapter takes them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(tiny_backbones[0])
    get_peft_model(llm, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "style")
    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo("org/loras")
    api.upload_folder(repo_id="org/loras", folder_path=tmp_path / "style", path_in_repo="style")
    result = run(
        LOAD_ADAPTER_FROM_A_SUBFOLDER, *tiny_backbones, str(tmp_path / "cache"), env=hub_env(hub, tmp_path)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refused:" in result.stdout and "['c', 'default']" in result.stdout


PRIVATE_BACKBONES = """
import sys
import torch
from conftest import tiny_sample_inputs
from transformers import AutoProcessor
from mmadapters import CromeForConditionalGeneration, CromeProcessor, LavinForConditionalGeneration, LavinProcessor
token, folder = sys.argv[1:3]
model = LavinForConditionalGeneration.from_backbones("org/tiny-llm", "org/tiny-vision", token=token)
processor = LavinProcessor.from_backbones("org/tiny-llm", "org/tiny-vision", token=token)
assert model.config.image_token_id == processor.image_token_id  # the tokenizer's, read with the token
crome = CromeForConditionalGeneration.from_backbones("org/tiny-llm", "org/tiny-vision", num_query_tokens=4, token=token)
crome_processor = CromeProcessor.from_model(crome, token=token)
assert crome.config.image_token_id == crome_processor.image_token_id
crome(**tiny_sample_inputs(crome_processor))
model.push_to_hub("me/no-processor", token=token, license="apache-2.0")  # no processor files
model.push_to_hub("me/with-processor", token=token, license="apache-2.0")
processor.push_to_hub("me/with-processor", token=token)  # transformers' way: the processor pushed on its own
model.save_pretrained(folder)
expected = tiny_sample_inputs(processor)
for rebuilt in (
    AutoProcessor.from_pretrained("me/with-processor", token=token),
    AutoProcessor.from_pretrained("me/no-processor", token=token),
    LavinProcessor.from_pretrained(folder, token=token),
    LavinProcessor.from_model(model, token=token),
):
    assert type(rebuilt) is LavinProcessor
    got = tiny_sample_inputs(rebuilt)
    assert all(torch.equal(got[name], expected[name]) for name in expected)
print("ok")
"""


def test_processors_load_private_backbones_with_the_token_given(hub, tiny_backbones, tmp_path):
    """The processors take the Hub keywords the models take (`token`, `cache_dir`, ...) for their backbones' files
    (they were dropped: a private or gated LLM such as LaVIN's LLaMA failed), the models read the LLM's tokenizer
    with them too (CROME failed; LaVIN gave the image token another id than the processor's), and a Hub checkpoint
    pushed without
    processor files gets its processor rebuilt from its backbones, as a local folder does (the model card's
    `AutoProcessor.from_pretrained(repo)` failed for it)."""
    from conftest import make_tokenizer, tiny_text_config
    from transformers import AutoModelForCausalLM

    # An LLM whose vocabulary is larger than its tokenizer (as Qwen's): the image token's id comes from the tokenizer,
    # which only the token can read (the model used the first id past the vocabulary when it could not).
    tokenizer = make_tokenizer()
    AutoModelForCausalLM.from_config(tiny_text_config(vocab_size=len(tokenizer) + 6)).save_pretrained(
        tmp_path / "llm"
    )
    tokenizer.save_pretrained(tmp_path / "llm")
    api = HfApi(endpoint=hub.url, token=TOKEN)
    for repo_id, folder in (("org/tiny-llm", tmp_path / "llm"), ("org/tiny-vision", tiny_backbones[1])):
        api.create_repo(repo_id, private=True)
        upload_plain(hub, repo_id, folder)
    env = {name: value for name, value in hub_env(hub, tmp_path).items() if name != "HF_TOKEN"}
    result = run(PRIVATE_BACKBONES, TOKEN, str(tmp_path / "local"), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "ok"
    assert TOKEN not in result.stdout + result.stderr


CROME_FROM_A_HUB_INSTRUCTBLIP = """
import sys, json, torch
from conftest import tiny_sample_inputs
from mmadapters.convert import from_instructblip
llm, folder, out, token = sys.argv[1:5]
model, processor = from_instructblip("Salesforce/instructblip-tiny", text_model=llm, token=token)
model.save_pretrained(folder)  # without its processor: rebuilt from the records where it is loaded
inputs = tiny_sample_inputs(processor)
torch.save({"inputs": dict(inputs), "logits": model.eval()(**inputs).logits}, out)
print(json.dumps(model.config.vision_backbone))
"""

LOAD_CROME_ELSEWHERE = """
import sys, torch
from conftest import tiny_sample_inputs
from mmadapters import CromeForConditionalGeneration, CromeProcessor
folder, out, token = sys.argv[1:4]
model = CromeForConditionalGeneration.from_pretrained(folder, token=token).eval()
inputs = tiny_sample_inputs(CromeProcessor.from_pretrained(folder, token=token))
torch.save({"inputs": dict(inputs), "logits": model(**inputs).logits}, out)
"""


def test_crome_from_a_hub_instructblip_records_the_repo_and_loads_on_another_machine(
    hub, tiny_backbones, tmp_path
):
    """from_instructblip("org/repo") recorded the vision backbone as the local Hub-cache folder it was read from,
    so the checkpoint did not load elsewhere (and a push needed --allow-local-backbones); it records the repo id,
    pinned to the commit, and a machine with another cache loads the checkpoint and rebuilds its processor, with
    InstructBLIP's Q-Former tokenizer, to the same inputs and logits. A private InstructBLIP is read with the `token`
    given to from_instructblip and to from_pretrained (the conversion and the load of the Q-Former it references
    read it without)."""
    from conftest import save_tiny_instructblip

    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo("Salesforce/instructblip-tiny", private=True)  # read with the token given, not HF_TOKEN
    commit = api.upload_folder(
        repo_id="Salesforce/instructblip-tiny", folder_path=save_tiny_instructblip(tmp_path / "instructblip")
    ).oid
    env = {name: value for name, value in hub_env(hub, tmp_path).items() if name != "HF_TOKEN"}
    built = run(
        CROME_FROM_A_HUB_INSTRUCTBLIP,
        tiny_backbones[0],
        str(tmp_path / "ckpt"),
        str(tmp_path / "a.pt"),
        TOKEN,
        env=env,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    recorded = json.loads(built.stdout.strip().splitlines()[-1])
    assert (recorded["name_or_path"], recorded["revision"]) == ("Salesforce/instructblip-tiny", commit)
    elsewhere = {**env, "HF_HOME": str(tmp_path / "another-machine")}
    loaded = run(LOAD_CROME_ELSEWHERE, str(tmp_path / "ckpt"), str(tmp_path / "b.pt"), TOKEN, env=elsewhere)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert all(torch.equal(a["inputs"][key], b["inputs"][key]) for key in a["inputs"])
    torch.testing.assert_close(a["logits"], b["logits"], rtol=0, atol=0)


TRAIN_AND_PUSH = """
import sys, json, torch
from conftest import make_trainer, toy_dataset
from mmadapters import LavinForConditionalGeneration, LavinProcessor
output_dir, data, token = sys.argv[1:4]
torch.manual_seed(0)
model = LavinForConditionalGeneration.from_backbones("org/tiny-llm", "org/tiny-vision")
processor = LavinProcessor.from_backbones("org/tiny-llm", "org/tiny-vision")
push = dict(push_to_hub=True, hub_model_id="me/run", hub_strategy="checkpoint", hub_token=token, hub_private_repo=True)
trainer = make_trainer(
    model, processor, toy_dataset(data), output_dir, max_steps=4, training=dict(save_steps=2, **push),
    hub_license="apache-2.0",
)
trainer.train()
pushing = trainer.push_to_hub(tags="easy-vqa", blocking=False)  # a Future of the commit URL
print(json.dumps({"url": pushing.result(), "repo": trainer.hub_model_id}))
"""


TRAIN_AND_PUSH_TO_A_BRANCH = """
import sys, torch
from conftest import make_trainer, toy_dataset
from mmadapters import LavinForConditionalGeneration, LavinProcessor
output_dir, data, token = sys.argv[1:4]
torch.manual_seed(0)
model = LavinForConditionalGeneration.from_backbones("org/tiny-llm", "org/tiny-vision")
processor = LavinProcessor.from_backbones("org/tiny-llm", "org/tiny-vision")
push = dict(
    push_to_hub=True, hub_model_id="me/branch-run", hub_token=token, hub_revision="dev",
    hub_strategy="all_checkpoints",
)
trainer = make_trainer(
    model, processor, toy_dataset(data, n=8), output_dir, max_steps=2, training=dict(save_steps=2, **push),
    hub_license="apache-2.0",
)
trainer.train()
trainer.push_to_hub()
"""


LOAD_SUBFOLDER = """
import sys, json, os
from safetensors.torch import load_file
import mmadapters
from transformers import AutoModelForImageTextToText, AutoProcessor
repo, subfolder, cache = sys.argv[1:4]
model = AutoModelForImageTextToText.from_pretrained(repo, subfolder=subfolder, cache_dir=cache)
AutoProcessor.from_pretrained(repo, subfolder=subfolder, cache_dir=cache)
root = AutoModelForImageTextToText.from_pretrained(repo, cache_dir=cache)
downloaded = sorted(
    os.path.relpath(os.path.join(folder, name), cache) for folder, _, names in os.walk(cache) for name in names
)
state = {k: v.tolist() for k, v in model.adapter_state_dict().items()}
print(json.dumps({"state": state, "downloaded": downloaded}))
"""


LOAD_A_BACKBONE_REPO = """
import sys
from mmadapters import LavinForConditionalGeneration
from mmadapters.checkpoint_files import CheckpointKindError
try:
    LavinForConditionalGeneration.from_pretrained(sys.argv[1])
except CheckpointKindError as error:
    print(error)
"""


def train_and_push(hub, tiny_backbones, tmp_path, script):
    """Run a training `script` (TRAIN_AND_PUSH...) in its own process against the local Hub, with the backbones on
    it and the token in `hub_token` only (not in the environment); returns the finished process and its output
    folder."""
    upload_plain(hub, "org/tiny-llm", tiny_backbones[0])
    upload_plain(hub, "org/tiny-vision", tiny_backbones[1])
    env = {name: value for name, value in hub_env(hub, tmp_path).items() if name != "HF_TOKEN"}
    output_dir = tmp_path / "run"
    (tmp_path / "data").mkdir()
    trained = run(script, str(output_dir), str(tmp_path / "data"), TOKEN, env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    return trained, output_dir


def test_trainer_pushes_to_the_branch_hub_revision_names(hub, tiny_backbones, tmp_path):
    """TrainingArguments(hub_revision="dev"): the checkpoint pushes during training and the final push go to that
    branch (created from main, as transformers does); main holds no adapters. hub_strategy="all_checkpoints":
    each checkpoint, Trainer state included, in its own checkpoint-N/ folder of the repo."""
    _, output_dir = train_and_push(hub, tiny_backbones, tmp_path, TRAIN_AND_PUSH_TO_A_BRANCH)
    repo = hub.repos["me/branch-run"]
    on_main = repo.files_at("main")
    assert on_main is None or "mmadapters_model.safetensors" not in on_main[1]
    on_dev = repo.files_at("dev")[1]
    assert (
        on_dev["mmadapters_model.safetensors"] == (output_dir / "mmadapters_model.safetensors").read_bytes()
    )
    assert "library_name: mmadapters" in on_dev["README.md"].decode()
    saved = output_dir / "checkpoint-2"
    for name in ("mmadapters_model.safetensors", "optimizer.pt", "trainer_state.json"):
        assert on_dev[f"checkpoint-2/{name}"] == (saved / name).read_bytes()


LOAD_TWICE_THE_SECOND_FORCED = """
import sys
from mmadapters import LavinForConditionalGeneration
LavinForConditionalGeneration.from_pretrained(sys.argv[1])
LavinForConditionalGeneration.from_pretrained(sys.argv[1])  # from the cache
LavinForConditionalGeneration.from_pretrained(sys.argv[1], force_download=True)
"""


def test_force_download_downloads_the_checkpoint_again(hub, checkpoint, tmp_path):
    """`from_pretrained(repo, force_download=True)` (what users pass to mend a broken cache) reached the
    backbones only: the checkpoint's own files came from the cache."""
    upload_plain(hub, "me/lavin", checkpoint[1])
    loaded = run(LOAD_TWICE_THE_SECOND_FORCED, "me/lavin", env=hub_env(hub, tmp_path))
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    downloads = [path for method, path in hub.requests if method == "GET" and "/resolve/" in path]
    weights = [path for path in downloads if path.endswith("/mmadapters_model.safetensors")]
    assert len(weights) == 2, downloads  # the first load and the forced one
    configs = [path for path in downloads if path.endswith("/config.json")]
    assert len(configs) >= 2, downloads


def test_a_backbone_repo_given_as_a_checkpoint_is_refused_without_downloading_its_weights(
    hub, tiny_backbones, tmp_path
):
    upload_plain(hub, "org/tiny-llm", tiny_backbones[0])
    refused = run(LOAD_A_BACKBONE_REPO, "org/tiny-llm", env=hub_env(hub, tmp_path))
    assert refused.returncode == 0, refused.stderr[-3000:]
    assert "'org/tiny-llm' holds a 'llama' model, not a LaVIN checkpoint" in refused.stdout
    downloads = [path for method, path in hub.requests if method == "GET" and "/resolve/" in path]
    assert downloads and all(path.split("?")[0].endswith("/config.json") for path in downloads), downloads


def test_trainer_push_to_hub_pushes_adapter_checkpoints_with_our_card_and_no_token(
    hub, tiny_backbones, tmp_path
):
    """TrainingArguments(push_to_hub=True, hub_strategy="checkpoint"): each save is one commit with the adapters at
    the repo's root (transformers' own push would leave them out until the end) and the whole checkpoint in
    last-checkpoint/; `push_to_hub()` at the end pushes the final adapters with our model card (license, tags).
    The token travels in `hub_token` only and is in no pushed file; the repo loads."""
    trained, output_dir = train_and_push(hub, tiny_backbones, tmp_path, TRAIN_AND_PUSH)
    assert TOKEN not in trained.stdout + trained.stderr
    result = json.loads(trained.stdout.strip().splitlines()[-1])
    assert result["repo"] == "me/run" and "/me/run/commit/" in result["url"]

    repo = hub.repos["me/run"]
    assert repo.private
    commits = [files for _, files in repo.commits[1:]]  # after the repo's creation
    assert len(commits) == 3  # step 2, step 4, end of training
    for step, files in zip((2, 4), commits, strict=False):
        saved = output_dir / f"checkpoint-{step}"
        assert files["mmadapters_model.safetensors"] == (saved / "mmadapters_model.safetensors").read_bytes()
        assert files["last-checkpoint/optimizer.pt"] == (saved / "optimizer.pt").read_bytes()
        assert {"last-checkpoint/trainer_state.json", "last-checkpoint/training_args.bin"} <= set(files)
    final = commits[-1]
    assert final["mmadapters_model.safetensors"] == (output_dir / "mmadapters_model.safetensors").read_bytes()
    assert not {"training_args.bin", "optimizer.pt", "trainer_state.json"} & set(final)
    assert not any(name.startswith(("runs/", "checkpoint-")) for name in final)
    card = final["README.md"].decode()
    assert "license: apache-2.0" in card and "easy-vqa" in card and "library_name: mmadapters" in card
    for files in commits:
        for name, content in files.items():
            assert TOKEN.encode() not in content, name

    loaded = run(LOAD_FROM_HUB, "me/run", str(tmp_path / "got.pt"), env=hub_env(hub, tmp_path))
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert json.loads(loaded.stdout.strip().splitlines()[-1])["class"] == "LavinForConditionalGeneration"

    # from_pretrained(repo, subfolder="last-checkpoint") loads the last checkpoint's adapters; loading the root
    # downloads no checkpoint folder (optimizer states and all).
    cache = tmp_path / "cache"
    loaded = run(LOAD_SUBFOLDER, "me/run", "last-checkpoint", str(cache), env=hub_env(hub, tmp_path))
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    result = json.loads(loaded.stdout.strip().splitlines()[-1])
    saved = load_file(output_dir / "checkpoint-4" / "mmadapters_model.safetensors")
    assert result["state"] == {k: v.tolist() for k, v in saved.items()}
    root_files = [
        path for path in result["downloaded"] if "/snapshots/" in path and "last-checkpoint" not in path
    ]
    assert any(path.endswith("mmadapters_model.safetensors") for path in root_files)
    assert not any(path.endswith(("optimizer.pt", "trainer_state.json")) for path in root_files)

    # A recipe with push_to_hub (hub_strategy "end"): `mmadapters train` pushes the final adapters at the end.
    training = {"max_steps": 2, "per_device_train_batch_size": 4, "use_cpu": True, "save_strategy": "no"}
    training.update(push_to_hub=True, hub_model_id="me/recipe-run")
    (tmp_path / "recipe").mkdir()
    recipe = write_recipe(
        tmp_path / "recipe", ("org/tiny-llm", "org/tiny-vision"), training=training, hub_license="apache-2.0"
    )
    command = [sys.executable, "-m", "mmadapters.cli", "train", str(recipe)]
    trained = subprocess.run(command, env=hub_env(hub, tmp_path), capture_output=True, text=True, check=False)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "Pushed the final checkpoint to " in trained.stdout and "/me/recipe-run/commit/" in trained.stdout
    files = hub.repos["me/recipe-run"].commits[-1][1]
    assert (
        files["mmadapters_model.safetensors"]
        == (tmp_path / "recipe" / "run" / "final" / "mmadapters_model.safetensors").read_bytes()
    )


@pytest.fixture()
def checkpoint(tiny_backbones, tmp_path):
    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder, processor=LavinProcessor.from_backbones(*tiny_backbones))
    return model, str(folder)


def test_dry_run_lists_files_and_contacts_nobody(hub, checkpoint, capsys):
    _, folder = checkpoint
    planned = push_folder(
        folder,
        "org/x",
        dry_run=True,
        endpoint=hub.url,
        token=TOKEN,
        allow_local_backbones=True,
        license="mit",
    )
    names = {f.path for f in planned}
    assert {"config.json", "mmadapters_model.safetensors", "README.md"} <= names
    size = next(f.size for f in planned if f.path == "mmadapters_model.safetensors")
    assert size == os.path.getsize(os.path.join(folder, "mmadapters_model.safetensors"))
    assert hub.requests == []

    from mmadapters.cli import main

    assert (
        main(["push", folder, "org/x", "--dry-run", "--allow-local-backbones", "--license", "apache-2.0"])
        == 0
    )
    out = capsys.readouterr().out
    assert "mmadapters_model.safetensors" in out and "total" in out and hub.requests == []


def test_refuses_backbone_weights_unless_asked(hub, tiny_backbones, tmp_path):
    model = LavinForConditionalGeneration.from_backbones(*tiny_backbones)
    full = tmp_path / "full"
    model.save_pretrained(full, adapter_only=False)
    with pytest.raises(PushError, match="holds backbone weights"):
        push_folder(
            full, "org/full", endpoint=hub.url, token=TOKEN, allow_local_backbones=True, license="apache-2.0"
        )
    assert "org/full" not in hub.repos
    push_folder(
        full,
        "org/full",
        endpoint=hub.url,
        token=TOKEN,
        include_backbone_weights=True,
        allow_local_backbones=True,
        license="apache-2.0",
    )
    assert "model.safetensors" in hub.repos["org/full"].commits[-1][1]


def test_model_push_to_hub_private_and_existing_repo(hub, checkpoint, tiny_backbones):
    model, _ = checkpoint
    url = model.push_to_hub(
        "org/lavin",
        private=True,
        token=TOKEN,
        endpoint=hub.url,
        allow_local_backbones=True,
        license="apache-2.0",
    )
    repo = hub.repos["org/lavin"]
    assert repo.private and url.endswith(repo.commits[-1][0])
    # No adapter_config.json: transformers' Auto classes would take the repo for a PEFT adapter.
    assert "adapter_config.json" not in repo.commits[-1][1]
    # Private: anonymous reads are refused.
    with pytest.raises(Exception, match="404|not found|Repository"):
        HfApi(endpoint=hub.url, token=False).model_info("org/lavin")
    # The repo exists: a second push adds a commit with the new files.
    processor = LavinProcessor.from_backbones(*tiny_backbones)
    model.push_to_hub(
        "org/lavin",
        processor=processor,
        token=TOKEN,
        endpoint=hub.url,
        allow_local_backbones=True,
        license="apache-2.0",
    )
    assert len(repo.commits) == 3 and "processor_config.json" in repo.commits[-1][1]


def test_push_to_a_new_branch_creates_it(hub, checkpoint):
    """`revision=` names the branch to push to; a branch the repo does not have yet is created from main, as
    transformers' push_to_hub does (the Hub refuses a commit to a missing branch)."""
    model, folder = checkpoint
    common = dict(token=TOKEN, endpoint=hub.url, allow_local_backbones=True, license="apache-2.0")
    model.push_to_hub("org/branches", **common)
    main_head = hub.repos["org/branches"].heads["main"]
    url = model.push_to_hub("org/branches", revision="dev", commit_message="on dev", **common)
    repo = hub.repos["org/branches"]
    assert repo.heads["main"] == main_head and url.endswith(repo.heads["dev"])
    push_folder(folder, "org/branches", revision="v2", **common)  # the folder push too, into the same repo
    assert "mmadapters_model.safetensors" in repo.files_at("v2")[1]
    assert (
        repo.files_at("dev")[1]["mmadapters_model.safetensors"]
        == repo.files_at("v2")[1]["mmadapters_model.safetensors"]
    )


def test_transient_5xx_are_retried(hub, checkpoint):
    _, folder = checkpoint
    hub.fail_next = 2  # create_repo fails twice, then the server recovers
    push_folder(
        folder,
        "org/retry",
        endpoint=hub.url,
        token=TOKEN,
        retry_wait=0.01,
        allow_local_backbones=True,
        license="mit",
    )
    assert sum(1 for method, _ in hub.requests if method == "POST") >= 4
    assert "mmadapters_model.safetensors" in hub.repos["org/retry"].commits[-1][1]


def test_persistent_5xx_gives_a_clear_error(hub, checkpoint):
    _, folder = checkpoint
    hub.fail_next = 100
    with pytest.raises(PushError, match="Could not create the repo"):
        push_folder(
            folder,
            "org/down",
            endpoint=hub.url,
            token=TOKEN,
            retries=2,
            retry_wait=0.01,
            allow_local_backbones=True,
            license="apache-2.0",
        )


def test_wrong_token_is_refused_without_printing_it(hub, checkpoint):
    _, folder = checkpoint
    wrong = "hf_wrong_token_abcdefghijklmnop"
    with pytest.raises(PushError, match="refused the credentials") as error:
        push_folder(
            folder,
            "org/auth",
            endpoint=hub.url,
            token=wrong,
            retry_wait=0.01,
            allow_local_backbones=True,
            license="mit",
        )
    assert wrong not in str(error.value) and TOKEN not in str(error.value)
    assert "org/auth" not in hub.repos


def test_server_down_is_a_clear_error(checkpoint):
    _, folder = checkpoint
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PushError, match="Could not reach the Hub"):
        push_folder(
            folder,
            "org/x",
            endpoint=f"http://127.0.0.1:{port}",
            token=TOKEN,
            retries=1,
            retry_wait=0.01,
            allow_local_backbones=True,
            license="apache-2.0",
        )


def test_model_card(checkpoint, tmp_path):
    model, folder = checkpoint
    card = str(build_model_card(folder, "org/lavin", license="apache-2.0"))
    assert "pipeline_tag: image-text-to-text" in card and "library_name: mmadapters" in card
    assert "base_model" not in card  # local backbones are not Hub models
    assert "No evaluation was recorded" in card and 'from_pretrained("org/lavin")' in card
    result = {"accuracy": 0.75, "by_group": {"color": 0.5, "shape": 1.0}, "count": 8}
    write_eval_results(folder, "easy-vqa test", result, "mmadapters eval")
    card = str(build_model_card(folder, "org/lavin", license="apache-2.0"))
    assert (
        "| accuracy | 0.7500 |" in card
        and "| accuracy (shape) | 1.0000 |" in card
        and "On 8 questions" in card
    )
    config = json.loads(open(os.path.join(folder, "config.json")).read())
    config["text_backbone"]["name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    card = str(build_model_card(folder, "org/lavin", license="apache-2.0"))
    assert "base_model:\n- HuggingFaceTB/SmolLM2-135M-Instruct" in card
    params = sum(p.numel() for p in model.adapter_state_dict().values())
    assert f"{params:,} trainable parameters" in card
    assert 'pip install "mmadapters>=' in card and "quantised" not in card

    # LaVIN-lite: the card says how the LLM loads, and installs bitsandbytes (the `quant` extra) with the package.
    config["backbone_quantization"] = {
        "text_config": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    card = str(build_model_card(folder, "org/lavin", license="apache-2.0"))
    assert 'pip install "mmadapters[quant]>=' in card
    assert "loads them quantised again: the LLM (bitsandbytes, 4-bit nf4)" in card


def test_crome_checkpoint_card_and_push(tiny_backbones, tmp_path, hub):
    from conftest import tiny_qformer_config

    from mmadapters import CromeForConditionalGeneration

    model = CromeForConditionalGeneration.from_backbones(*tiny_backbones, qformer=tiny_qformer_config())
    folder = tmp_path / "crome"
    model.save_pretrained(folder)
    card = str(build_model_card(str(folder), "org/crome", license="apache-2.0"))
    assert "CROME adapters" in card and "pipeline_tag: image-text-to-text" in card
    push_folder(
        folder, "org/crome", endpoint=hub.url, token=TOKEN, allow_local_backbones=True, license="apache-2.0"
    )
    files = hub.repos["org/crome"].commits[-1][1]
    assert "adapter_config.json" not in files and "mmadapters_model.safetensors" in files
    assert b"CROME adapters" in files["README.md"]


def test_commands_take_hub_ids_and_refuse_missing_folders(tmp_path):
    from mmadapters.hub import check_checkpoint_name

    check_checkpoint_name("org/lavin")  # a Hub id: left to the Hub client
    check_checkpoint_name("gpt2")
    check_checkpoint_name(str(tmp_path))  # an existing folder
    for missing in (str(tmp_path / "nope"), "./nope", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            check_checkpoint_name(missing)


LOAD_WITH_REMOTE_CODE = """
import sys, json, torch
assert "mmadapters" not in sys.modules
from conftest_free import tiny_inputs
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True)
processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
with torch.no_grad():
    torch.save(model(**tiny_inputs(processor)).logits, sys.argv[2])
pipe = pipeline("image-text-to-text", model=sys.argv[1], trust_remote_code=True)
messages = [{"role": "user", "content": [{"type": "text", "text": "the capital of"}]}]
answer = pipe(text=messages, max_new_tokens=4, generate_kwargs={"do_sample": False}, return_full_text=False)[0]["generated_text"]
print(json.dumps({"model": type(model).__name__, "processor": type(processor).__name__,
                  "pipeline_model": type(pipe.model).__name__, "answer": answer}))
"""

# The test's inputs without conftest (which imports mmadapters): the same fixed batch as tiny_sample_inputs.
CONFTEST_FREE = """
import torch
def tiny_inputs(processor):
    generator = torch.Generator().manual_seed(0)
    image = (torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return processor(images=[[image], []], text=["Image: <image>\\nwhat color is it?", "Image: N/A\\nthe capital of"])
"""

MISSING_PACKAGE = """
import sys
sys.modules["mmadapters"] = None  # as if it were not installed
from transformers import AutoModelForImageTextToText
AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True)
"""


def test_a_pushed_repo_loads_with_trust_remote_code_in_a_process_that_never_imports_mmadapters(
    hub, tiny_backbones, tmp_path
):
    upload_plain(hub, "org/tiny-llm", tiny_backbones[0])
    upload_plain(hub, "org/tiny-vision", tiny_backbones[1])
    env = hub_env(hub, tmp_path)
    folder, expected_file = tmp_path / "lavin", tmp_path / "expected.pt"
    built = run(BUILD_AND_SAVE, str(folder), str(expected_file), env=env)
    assert built.returncode == 0, built.stderr[-3000:]
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModelForImageTextToText"] == (
        "mmadapters_loader.LavinForConditionalGeneration"
    )
    assert json.loads((folder / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "mmadapters_loader.LavinProcessor"
    }
    push_folder(
        folder,
        "org/lavin-remote",
        endpoint=hub.url,
        token=TOKEN,
        allow_local_backbones=True,
        license="apache-2.0",
    )
    assert "mmadapters_loader.py" in hub.repos["org/lavin-remote"].commits[-1][1]

    helper = tmp_path / "helper"
    helper.mkdir()
    (helper / "conftest_free.py").write_text(CONFTEST_FREE)
    remote_env = {**env, "PYTHONPATH": str(helper)}
    got_file = tmp_path / "got.pt"
    loaded = run(LOAD_WITH_REMOTE_CODE, "org/lavin-remote", str(got_file), env=remote_env)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    info = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert info["model"] == info["pipeline_model"] == "LavinForConditionalGeneration"
    assert info["processor"] == "LavinProcessor"
    assert torch.equal(torch.load(got_file), torch.load(expected_file))

    # Without the package: one message that says what the repo is and how to install what it needs.
    missing = run(MISSING_PACKAGE, "org/lavin-remote", env=remote_env)
    assert missing.returncode != 0
    assert 'pip install "mmadapters>=0.2.0"' in missing.stderr and "LaVIN/CROME adapters" in missing.stderr


def test_card_front_matter_license_and_model_index(checkpoint):
    import yaml

    from mmadapters.hub.model_card import LicenseError, decide_license

    _, folder = checkpoint
    result = {"accuracy": 0.75, "by_group": {"color": 0.5}, "count": 8}
    write_eval_results(folder, "easy-vqa test", result, "mmadapters eval")
    config = json.loads(open(os.path.join(folder, "config.json")).read())
    config["text_backbone"]["name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    card = str(build_model_card(folder, "org/lavin", license="apache-2.0"))
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "apache-2.0" and front["library_name"] == "mmadapters"
    assert (
        front["base_model"] == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
        and front["base_model_relation"] == "adapter"
    )
    assert front["pipeline_tag"] == "image-text-to-text"
    results = front["model-index"][0]["results"][0]
    assert results["dataset"]["name"] == "easy-vqa test"
    assert {m["name"]: m["value"] for m in results["metrics"]} == {"accuracy": 0.75, "accuracy (color)": 0.5}
    assert 'pip install "mmadapters>=0.2.0"' in card
    # The license: given, or the backbones' common one; unknown or different licenses are refused.
    assert decide_license({"a": "mit", "b": "mit"}, None) == "mit"
    with pytest.raises(LicenseError, match="--license"):
        decide_license({"a": "mit", "b": None}, None)
    with pytest.raises(LicenseError, match="a: llama2, b: mit"):
        decide_license({"a": "llama2", "b": "mit"}, None)
    with pytest.raises(PushError, match="needs a license"):
        push_folder(folder, "org/lavin", dry_run=True, allow_local_backbones=True)


def test_embedded_backbones_have_known_licenses(tmp_path):
    from mmadapters.hub.model_card import KNOWN_LICENSES
    from mmadapters.modeling.embedded import SMOLLM2_DIR, VISION_DIR

    assert {f"mmadapters://embedded/{name}" for name in (SMOLLM2_DIR, VISION_DIR)} == set(KNOWN_LICENSES)


def test_card_snippet_runs_as_written_and_the_license_comes_from_the_backbones_cards(
    hub, tiny_backbones, tmp_path
):
    import re

    for repo_id, folder in (("org/tiny-llm", tiny_backbones[0]), ("org/tiny-vision", tiny_backbones[1])):
        upload_plain(hub, repo_id, with_license(folder, tmp_path / repo_id.split("/")[1], "mit"))
    env = hub_env(hub, tmp_path)
    folder = tmp_path / "lavin"
    built = run(BUILD_AND_SAVE, str(folder), str(tmp_path / "expected.pt"), env=env)
    assert built.returncode == 0, built.stderr[-3000:]
    push_folder(folder, "org/lavin-card", endpoint=hub.url, token=TOKEN)  # Hub backbones: no license needed
    card = hub.repos["org/lavin-card"].commits[-1][1]["README.md"].decode()
    assert "license: mit" in card
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    ran = run(snippet, env=env)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.endswith("\n")  # it reached the last line and printed the decoded answer
