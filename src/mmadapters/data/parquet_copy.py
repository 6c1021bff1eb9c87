"""A local copy of a Hub data set in the Hub's parquet layout (`data/{split}-00000-of-00001.parquet`, or one parquet
file), for machines without the Hub."""

from __future__ import annotations

import glob
import os
from typing import Any


def read_parquet_copy(source: str, split: str) -> Any:
    """The rows of `split` in a folder of parquet files in the Hub layout, or of one parquet file."""
    import datasets

    files = [source] if os.path.isfile(source) else split_files(source, split)
    return datasets.load_dataset("parquet", data_files=files, split="train")


def split_files(folder: str, split: str) -> list[str]:
    every = sorted(glob.glob(os.path.join(folder, "**", "*.parquet"), recursive=True))
    chosen = [
        f for f in every if os.path.basename(f).startswith(f"{split}-") or f"{os.sep}{split}{os.sep}" in f
    ]
    if not chosen:
        raise FileNotFoundError(
            f"No parquet files of split '{split}' under {folder} (expected the Hub layout, e.g. "
            f"data/{split}-00000-of-00001.parquet); found {[os.path.relpath(f, folder) for f in every][:5]}."
        )
    return chosen
