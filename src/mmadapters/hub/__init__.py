"""Hub sharing: push adapter-only checkpoints with a generated model card.

A bottom-layer package (from mmadapters it imports only the bottom-layer modules `checkpoint_files` and
`atomic`), so that models (`push_to_hub`, the remote-code loader), the CLI and the Spaces can all use it without
imports pointing up the layers.
"""

from .model_card import EVAL_RESULTS_NAME, build_model_card, write_eval_results
from .names import check_checkpoint_name, is_hub_id
from .push import (
    SPACE_SETTINGS_NAME,
    PushError,
    format_plan,
    push_folder,
    push_space,
)

__all__ = [
    "EVAL_RESULTS_NAME",
    "PushError",
    "build_model_card",
    "check_checkpoint_name",
    "is_hub_id",
    "format_plan",
    "push_folder",
    "push_space",
    "SPACE_SETTINGS_NAME",
    "write_eval_results",
]
