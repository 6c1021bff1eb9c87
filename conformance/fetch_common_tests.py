"""Put transformers' own common model tests (tests/test_modeling_common.py of the installed release) beside our
conformance tests, in conformance/_hf/ (not committed: it is transformers' code, fetched per release).

The file ships in the transformers sdist on the package registry. It imports two test modules that the sdist does
not carry (the export and generation tester mixins); empty stand-ins take their place, so their tests are not run
here (generation is covered by our own tests).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

TARGET = Path(__file__).resolve().parent / "_hf"
STAND_INS = {
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
}


def fetch(version: str = transformers.__version__) -> Path:
    stamp = TARGET / "VERSION"
    if stamp.is_file() and stamp.read_text().strip() == version:
        return TARGET
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-binary",
                ":all:",
                "--no-deps",
                f"transformers=={version}",
                "-d",
                scratch,
            ],
            check=True,
        )
        archive = next(Path(scratch).glob("transformers-*.tar.gz"))
        with tarfile.open(archive) as tar:
            member = tar.getmember(f"transformers-{version}/tests/test_modeling_common.py")
            source = tar.extractfile(member).read()
    shutil.rmtree(TARGET, ignore_errors=True)
    package = TARGET / "hf_tests"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "test_modeling_common.py").write_bytes(source)
    for name, text in STAND_INS.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").write_text("")
        path.write_text(text)
    stamp.write_text(version)
    return TARGET


if __name__ == "__main__":
    print(f"transformers {transformers.__version__} common tests in {fetch()}")
