"""Data sets as `datasets.Dataset`: easy-vqa, ScienceQA (QCM-ALE), LLaVA-style conversations."""

from .easy_vqa import load_easy_vqa
from .llava import load_llava_conversations
from .scienceqa import format_scienceqa, load_scienceqa, scienceqa_example

__all__ = [
    "format_scienceqa",
    "load_easy_vqa",
    "load_llava_conversations",
    "load_scienceqa",
    "scienceqa_example",
]
