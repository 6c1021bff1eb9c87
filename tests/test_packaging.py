"""The package builds as a wheel and an sdist whose metadata is right, and each installs and imports cleanly, so
`pip install mmadapters` is one release step away."""

from __future__ import annotations

import email
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import mmadapters

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    built = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    return out


def test_wheel_metadata_and_contents(dist):
    wheel = next(dist.glob("mmadapters-*.whl"))
    assert wheel.name.startswith(f"mmadapters-{mmadapters.__version__}-py3-none-any")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = email.message_from_bytes(
            archive.read(f"mmadapters-{mmadapters.__version__}.dist-info/METADATA")
        )
    assert metadata["Name"] == "mmadapters" and metadata["Version"] == mmadapters.__version__
    assert metadata["License-Expression"] == "Apache-2.0"
    requires = metadata.get_all("Requires-Dist")
    assert any(r.startswith("transformers") for r in requires) and any(r.startswith("peft") for r in requires)
    assert any('extra == "quant"' in r for r in requires)
    assert {
        "mmadapters/__init__.py",
        "mmadapters/hub/remote_code.py",
        "mmadapters/modeling/peft_on_top.py",
    } <= names
    assert not any(name.startswith("tests/") for name in names)
    assert f"mmadapters-{mmadapters.__version__}.dist-info/entry_points.txt" in names


@pytest.mark.parametrize("kind", ["whl", "tar.gz"])
def test_wheel_and_sdist_install_and_import(dist, kind, tmp_path):
    artifact = next(dist.glob(f"mmadapters-*.{kind}"))
    if kind == "tar.gz":
        with tarfile.open(artifact) as archive:
            assert f"mmadapters-{mmadapters.__version__}/LICENSE" in archive.getnames()
    target = tmp_path / "site"
    installed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(artifact),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    # The installed copy (not this checkout) imports, with the dependencies of this environment.
    check = "import mmadapters, sys; print(mmadapters.__file__, mmadapters.__version__)"
    ran = subprocess.run(
        [sys.executable, "-c", check],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(target), "PATH": ""},
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    path, version = ran.stdout.split()
    assert path.startswith(str(target)) and version == mmadapters.__version__
