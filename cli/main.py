"""The `trainjob` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from app.files.formats import FORMATS
from app.files.schemas import FileStatus
from app.jobs.schemas import JobStatus

JOB_STATUSES = get_args(JobStatus)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainjob",
        description="Train neural networks with exact gradient accumulation.",
    )
    # Also before the command (`trainjob --url URL list`); the same flag after the
    # command wins, as its defaults are suppressed (see add_client_options).
    add_client_options(parser, title="client options (submit, status, list, ...)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="train a job spec in the foreground, on this machine",
        description=(
            "Train SPEC (a .json, .yaml or .yml job spec) in the foreground with a progress "
            "bar. Writes DIR/weights.safetensors, DIR/metrics.jsonl, DIR/events.jsonl and "
            "DIR/checkpoints/; a spec with lora also DIR/adapter/ (adapter_model.safetensors "
            "and adapter_config.json, for peft.PeftModel.from_pretrained), and its "
            "DIR/weights.safetensors are the merged weights. Ctrl-C stops at the next "
            "optimizer step after a checkpoint; "
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
    run.add_argument(
        "--devices",
        type=int,
        metavar="N",
        help="train on N processes, one per device (default: the spec's devices); the "
        "batch stays, accumulation_steps follows",
    )

    serve = commands.add_parser(
        "serve",
        help="start the service (API, and by default one worker)",
        description=(
            "Start the HTTP API and one worker process. With no TRAINJOB_DATABASE_URL and "
            "TRAINJOB_REDIS_URL set, it keeps a SQLite database and a private Redis under "
            "TRAINJOB_HOME (default ./.trainjob). Ctrl-C stops everything. On an address other "
            "than a loopback one it refuses to start while authentication is off (no API key "
            "and TRAINJOB_AUTH=auto): create a key with `trainjob keys create --tenant NAME "
            "--admin`, or set TRAINJOB_AUTH=required (TRAINJOB_AUTH=off serves open)."
        ),
    )
    serve.add_argument("--host", help="address to listen on (default TRAINJOB_HOST, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default TRAINJOB_PORT, 8000)")
    serve.add_argument(
        "--no-worker", action="store_true", help="run the API only (production: run workers apart)"
    )

    worker = commands.add_parser(
        "worker",
        help="run a Celery worker (training, and file validations)",
        description=(
            "Run a worker against TRAINJOB_REDIS_URL and TRAINJOB_DATABASE_URL. It runs one "
            "job at a time, on up to as many devices as it owns (--devices): one worker per "
            "GPU (`--devices 0`, `--devices 1`, ...) runs one-device jobs side by side, one "
            "with `--devices 0,1,2,3` also runs jobs on 2 to 4 of them. Add a CPU worker with "
            "`--queues files` for uploaded files' validations."
        ),
    )
    worker.add_argument(
        "--queues",
        help="comma-separated queues (default: TRAINJOB_QUEUE and TRAINJOB_FILES_QUEUE, "
        "gpu,files: training and file validations)",
    )
    worker.add_argument(
        "--concurrency", type=int, default=1, help="training processes (default 1: one per GPU)"
    )
    worker.add_argument(
        "--devices",
        help="the devices it owns: CUDA indices (0,1,2,3) or cpu:N for N CPU processes "
        "(default TRAINJOB_WORKER_DEVICES, else every visible CUDA device, else cpu:1)",
    )

    commands.add_parser(
        "reaper",
        help="run the reaper alone (re-queues lost runs, re-sends lost messages)",
        description=(
            "Every TRAINJOB_REAPER_INTERVAL_SECONDS: re-queue running jobs whose worker "
            "stopped heartbeating, and send queued jobs whose message is missing from Redis. "
            "`trainjob serve` runs it already; use this where no API process runs."
        ),
    )

    keys = commands.add_parser(
        "keys",
        help="API keys: create (printed once), list, revoke",
        description=(
            "Manage API keys in the service's database. Once any key exists, every request "
            "but /healthz and /readyz needs `Authorization: Bearer KEY`."
        ),
    )
    key_actions = keys.add_subparsers(dest="key_action", required=True, metavar="ACTION")
    create = key_actions.add_parser("create", help="create a key for a tenant; prints it once")
    create.add_argument("--tenant", required=True, help="the tenant the key's jobs belong to")
    create.add_argument("--admin", action="store_true", help="sees and manages every tenant")
    create.add_argument("--name", help="a note, e.g. who holds the key")
    create.add_argument(
        "--max-priority",
        type=int,
        choices=range(0, 1001),
        metavar="N",
        help="the highest job priority this key may submit (0..1000; its tenant's cap applies too)",
    )
    create.add_argument("--json", action="store_true", help="print JSON")
    listing = key_actions.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--tenant", help="only this tenant's keys")
    listing.add_argument("--json", action="store_true", help="print JSON")
    revoke = key_actions.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id", help="the key's id (from `trainjob keys list`)")

    database = commands.add_parser("db", help="database migrations")
    database.add_argument(
        "action", choices=["upgrade", "downgrade", "current"], help="migrate, or show the revision"
    )
    database.add_argument(
        "revision",
        nargs="?",
        help="target revision (default: head for upgrade, base for downgrade)",
    )
    add_client_commands(commands)
    return parser


# `trainjob tenants set` options, as the API's fields (cli/tenants.py sends them).
TENANT_SETTINGS = (
    "share",
    "max_priority",
    "max_running_devices",
    "max_queued_jobs",
    "max_device_hours",
)
CLIENT_COMMANDS = (
    "submit",
    "status",
    "list",
    "watch",
    "cancel",
    "pause",
    "resume",
    "events",
    "download",
    "files",
    "tenants",
)
FILE_STATUSES = get_args(FileStatus)


def add_client_options(
    parser: argparse.ArgumentParser, *, title: str, after_command: bool = False
) -> None:
    """--url, --api-key and --json: on the top-level parser and on every client command.

    On a command they default to SUPPRESS, so that leaving them out after the command
    does not overwrite what was given before it.
    """
    unset: dict[str, Any] = {"default": argparse.SUPPRESS} if after_command else {}
    options = parser.add_argument_group(title)
    options.add_argument(
        "--url", help="the API (default TRAINJOB_URL, http://127.0.0.1:8000)", **unset
    )
    options.add_argument(
        "--api-key",
        metavar="KEY",
        help="sent as Authorization: Bearer KEY (default TRAINJOB_API_KEY; prefer the variable: "
        "arguments show in process lists)",
        **unset,
    )
    options.add_argument(
        "--json",
        dest="as_json",
        action="store_true",
        help="print the server's JSON (one document) instead of text, for scripts",
        **unset,
    )


def add_client_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The HTTP client of a running service; each command takes --url, --api-key, --json."""
    server = argparse.ArgumentParser(add_help=False)
    add_client_options(server, title="server options", after_command=True)

    def client(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[server], help=help, description=description)

    def job_client(name: str, help: str, description: str) -> argparse.ArgumentParser:
        parser = client(name, help, description)
        parser.add_argument("job_id", metavar="ID", help="job id")
        return parser

    submit = client(
        "submit",
        "submit a job spec to the service",
        "POST SPEC (.json, .yaml or .yml; - for standard input) as a new job and print its id. "
        "A spec the server rejects exits 1 with one line per bad field.",
    )
    submit.add_argument("spec", metavar="SPEC", help="job spec file")
    submit.add_argument(
        "--watch", action="store_true", help="then follow it to the end, as `trainjob watch`"
    )

    job_client("status", "show a job", "Status, progress, loss, batch size, attempts, error.")
    list_command = client("list", "list jobs, newest first", "A table of jobs, newest first.")
    list_command.add_argument("--status", choices=JOB_STATUSES, help="only jobs in this status")
    list_command.add_argument("--limit", type=int, metavar="N", help="page size, 1..100 (20)")
    list_command.add_argument("--after", metavar="ID", help="the page after this job id")
    job_client(
        "watch",
        "follow a job's progress live until it ends",
        "A live progress line (step, loss, samples/s, ETA) from the job's event stream, "
        "then its outcome. Exits 0 if the job succeeded, 1 if it failed or was cancelled.",
    )
    job_client(
        "cancel",
        "cancel a job",
        "A queued job is cancelled at once; a running one stops at its next optimizer step.",
    )
    job_client(
        "pause",
        "pause a job, keeping its checkpoint",
        "A queued job is paused at once; a running one is pausing until its next optimizer "
        "step, where it checkpoints and frees its device. `trainjob resume ID` continues it "
        "exactly where it stopped.",
    )
    job_client(
        "resume",
        "resume a paused job",
        "A paused job goes back to the queue and resumes from its latest checkpoint; a "
        "pausing one runs on as if never paused.",
    )
    events = job_client("events", "print a job's events", "Status, checkpoint, oom_backoff, ...")
    events.add_argument("--after", type=int, metavar="N", help="only events after id N")
    download = job_client(
        "download",
        "download a job's weights as safetensors",
        "Write the final (or latest) weights, or those of checkpoint --step N, to FILE "
        "(through a temporary file, so FILE is never left half-written). A LoRA job's "
        "weights are its adapter: a zip of peft's adapter_model.safetensors and "
        "adapter_config.json (--format peft, the default), or the safetensors alone "
        "(--format safetensors); --merged gives the base model with the adapter merged in "
        "(its final checkpoint has them).",
    )
    download.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="FILE",
        help="where to write (default ID.safetensors, or ID-stepN.safetensors; ID-adapter.zip "
        "for a LoRA adapter, ID-merged.safetensors for merged weights)",
    )
    download.add_argument("--step", type=int, metavar="N", help="the checkpoint at step N")
    download.add_argument(
        "--format",
        choices=["peft", "safetensors"],
        help="a LoRA job's adapter as a peft zip (default) or as safetensors alone",
    )
    download.add_argument(
        "--merged",
        action="store_true",
        help="a LoRA job's base model with the adapter merged in, as safetensors",
    )

    files = commands.add_parser(
        "files",
        help="data files to train on: upload, list, rm",
        description="Upload a dataset file (JSONL, CSV or NPZ) to the service, list the "
        "files, delete one. A job trains on a file with "
        '`"dataset": {"type": "file", "file_id": ID}`.',
    )
    actions = files.add_subparsers(dest="files_action", required=True, metavar="ACTION")
    upload = actions.add_parser(
        "upload",
        parents=[server],
        help="upload a file; prints it, validating",
        description="Stream PATH to the service. It comes back `validating`; a worker then "
        "checks it once. With --wait, wait for that check: exit 0 if the file is valid, "
        "1 if it is invalid (with its errors, by line or row).",
    )
    upload.add_argument("path", type=Path, metavar="PATH", help="the file")
    upload.add_argument(
        "--format",
        choices=FORMATS,
        help="default: from the name (.jsonl or .json, .csv, .npz)",
    )
    upload.add_argument("--wait", action="store_true", help="wait until it is valid or invalid")
    listing = actions.add_parser(
        "list", parents=[server], help="list files, newest first", description="A table."
    )
    listing.add_argument("--status", choices=FILE_STATUSES, help="only files in this status")
    listing.add_argument("--limit", type=int, metavar="N", help="page size, 1..100 (20)")
    listing.add_argument("--after", metavar="ID", help="the page after this file id")
    remove = actions.add_parser(
        "rm",
        parents=[server],
        help="delete a file",
        description="Delete the file and its bytes; refused (exit 1) while a queued or "
        "running job uses it.",
    )
    remove.add_argument("file_id", metavar="ID", help="file id")
    add_tenant_commands(commands, server)


# What a shell reports for a command that SIGPIPE ended (128 + 13), e.g. under
# `set -o pipefail`: the reader went away, not the command's own failure.
EXIT_BROKEN_PIPE = 141


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return run_command(argv)
        finally:
            # Flushed here, also after --help's SystemExit: a flush at interpreter exit
            # would print an "Exception ignored" traceback once the reader is gone.
            sys.stdout.flush()
    except BrokenPipeError:
        # The reader closed early (`trainjob events ID | head`): that is not an error to
        # report. Point stdout at devnull so that the exit's flush finds a writable file
        # (the recipe of Python's signal docs, "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def run_command(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in CLIENT_COMMANDS:
        # Imported here: the other commands need no HTTP client.
        from cli.client import client_command

        return client_command(args)
    options = (("--url", args.url), ("--api-key", args.api_key), ("--json", args.as_json))
    given = [flag for flag, value in options if value not in (None, False)]
    if given:
        parser.error(
            f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} for the client "
            f"commands ({', '.join(CLIENT_COMMANDS)}), not for {args.command}"
        )
    if args.command == "run":
        # Imported here: torch loads only for the commands that train.
        from cli.run import run_command

        return run_command(args.spec, args.out, args.resume, args.quiet, args.devices)
    from cli import serve

    if args.command == "serve":
        return serve.serve_command(args.host, args.port, with_worker=not args.no_worker)
    if args.command == "worker":
        return serve.worker_command(args.queues, args.concurrency, args.devices)
    if args.command == "reaper":
        return serve.reaper_command()
    if args.command == "keys":
        from cli.keys import keys_command

        return keys_command(args)
    if args.command == "db":
        return serve.db_command(args.action, args.revision)
    raise AssertionError(f"unhandled command {args.command}")


def add_tenant_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    server: argparse.ArgumentParser,
) -> None:
    tenants = commands.add_parser(
        "tenants",
        help="tenants' fair share, priority cap and quotas: set, list, show",
        description="An admin sets a tenant's fair-share weight, the highest job priority it "
        "may ask for and its quotas; a tenant's own key may show its usage.",
    )
    actions = tenants.add_subparsers(dest="tenants_action", required=True, metavar="ACTION")
    setter = actions.add_parser(
        "set",
        parents=[server],
        help="set a tenant's share, max priority or quotas (admin)",
        description="Options not given keep their values; `--clear NAME` (or the value "
        "`none`) removes a cap or quota.",
    )
    setter.add_argument("name", metavar="NAME", help="the tenant")
    setter.add_argument("--share", type=float, help="fair-share weight (default 1)")
    setter.add_argument("--max-priority", type=_int_or_none, help="highest job priority, 0..1000")
    setter.add_argument(
        "--max-running-devices", type=_int_or_none, help="devices its running jobs may hold"
    )
    setter.add_argument(
        "--max-queued-jobs", type=_int_or_none, help="queued jobs; a submit over it is 429"
    )
    setter.add_argument(
        "--max-device-hours",
        type=_float_or_none,
        help="device-hours over a rolling 30 days; a submit past it is 403",
    )
    setter.add_argument(
        "--clear", action="append", choices=TENANT_SETTINGS[1:], metavar="NAME", help="remove a cap"
    )
    listing = actions.add_parser(
        "list",
        parents=[server],
        help="list tenants with their usage (admin)",
        description="A table.",
    )
    listing.add_argument("--limit", type=int, metavar="N", help="page size, 1..100 (20)")
    listing.add_argument("--after", metavar="NAME", help="the page after this tenant")
    shown = actions.add_parser(
        "show", parents=[server], help="a tenant's settings and usage", description="Its caps."
    )
    shown.add_argument("name", metavar="NAME", help="the tenant")


def _int_or_none(value: str) -> int | str:
    return "none" if value == "none" else int(value)


def _float_or_none(value: str) -> float | str:
    return "none" if value == "none" else float(value)


if __name__ == "__main__":
    sys.exit(main())
