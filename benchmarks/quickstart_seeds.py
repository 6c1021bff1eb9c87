"""The quickstart's seed table: `mmadapters quickstart --seed S` for each seed, one after the other (run it on an
otherwise idle machine: `wall_seconds` is one of the figures), then each checkpoint evaluated on the whole
easy-vqa test split (`mmadapters eval CHECKPOINT --prompt-format describe --limit all`).

Prints the markdown table of benchmarks/README.md "Quickstart" and writes it, with every summary, to
OUTPUT/seeds.json. Extra arguments after `--` go to every quickstart run (e.g. `-- --llm-routing learned`).

    python benchmarks/quickstart_seeds.py [--seeds 0 1 2 3 4] [--output quickstart_seeds] [-- QUICKSTART FLAGS]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

GOALS = {"accuracy": 0.90, "whole_split": 0.90, "text_only_preserved": 0.90, "wall_seconds": 540}


def mmadapters_command() -> list[str]:
    return [sys.executable, "-m", "mmadapters.cli"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--output", default="quickstart_seeds", help="one folder per seed goes here")
    parser.add_argument(
        "--eval-batch-size", type=int, default=64, help="prompts per generate call (whole split)"
    )
    args, extra = parser.parse_known_args()
    extra = [flag for flag in extra if flag != "--"]
    output = Path(args.output)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    rows = []
    for seed in args.seeds:  # all quickstarts first: the whole-split evaluations do not overlap their timing
        folder = output / f"seed-{seed}"
        command = [
            *mmadapters_command(),
            "quickstart",
            "--seed",
            str(seed),
            "--output-dir",
            str(folder),
            *extra,
        ]
        print("$", " ".join(command[2:]), flush=True)
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        rows.append(json.loads((folder / "quickstart_summary.json").read_text()))
    for seed, summary in zip(args.seeds, rows, strict=True):
        result = output / f"seed-{seed}" / "eval_whole_test_split.json"
        command = [*mmadapters_command(), "eval", summary["checkpoint_dir"], "--prompt-format", "describe"]
        command += ["--limit", "all", "--batch-size", str(args.eval_batch_size)]
        print("$", " ".join(command[2:]), flush=True)
        printed = subprocess.run(command, check=True, env=env, capture_output=True, text=True).stdout
        whole = json.loads(printed[printed.index("{") :])
        result.write_text(json.dumps(whole, indent=2) + "\n")
        summary["whole_split"] = {
            "accuracy": whole["accuracy"],
            "count": whole["count"],
            "by_group": whole["by_group"],
        }
    lines = [
        "| seed | accuracy, 1,000 questions | accuracy, whole test split | text_only_preserved (first sentence) "
        "| text_only_identical (16 tokens) | wall_seconds |",
        "|---|---|---|---|---|---|",
    ]
    for seed, summary in zip(args.seeds, rows, strict=True):
        lines.append(
            f"| {seed} | {summary['accuracy_after']:.3f} | {summary['whole_split']['accuracy']:.3f} "
            f"({summary['whole_split']['count']:,}) | {summary['text_only_preserved']:.3f} "
            f"({summary['num_text_prompts_checked']} prompts) | {summary['text_only_identical']:.3f} "
            f"| {summary['wall_seconds']:.0f} |"
        )
    met = all(
        s["accuracy_after"] >= GOALS["accuracy"]
        and s["whole_split"]["accuracy"] >= GOALS["whole_split"]
        and s["text_only_preserved"] >= GOALS["text_only_preserved"]
        and s["wall_seconds"] <= GOALS["wall_seconds"]
        for s in rows
    )
    lines.append("")
    lines.append(f"goals ({GOALS}): {'met by every seed' if met else 'NOT met by every seed'}")
    table = "\n".join(lines)
    print(table)
    (output / "seeds.json").write_text(json.dumps({"table": table, "summaries": rows}, indent=2) + "\n")


if __name__ == "__main__":
    from mmadapters.library_logs import quiet_library_logs

    quiet_library_logs()
    main()
