"""The `trainjob` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainjob",
        description="Train neural networks with exact gradient accumulation.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="train a job spec in the foreground, on this machine",
        description=(
            "Train SPEC (a .json, .yaml or .yml job spec) in the foreground with a progress "
            "bar. Writes DIR/weights.safetensors, DIR/metrics.jsonl, DIR/events.jsonl and "
            "DIR/checkpoints/. Ctrl-C stops at the next optimizer step after a checkpoint; "
            "--resume DIR continues from the latest checkpoint to the same final weights."
        ),
    )
    run.add_argument("spec", nargs="?", type=Path, metavar="SPEC", help="job spec file")
    run.add_argument("--out", type=Path, metavar="DIR", help="output directory (new or empty)")
    run.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue the run in DIR from its latest checkpoint",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        # Imported here: torch loads only for the commands that train.
        from worker.cli.run import run_command

        return run_command(args.spec, args.out, args.resume, quiet=args.quiet)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
