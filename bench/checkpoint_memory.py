"""Peak memory of one checkpoint save: what a save adds to the worker's resident set.

Not part of CI (tests/worker/test_checkpoint_memory.py runs the `small` size). Each
store runs in a fresh child process (this script with `--child`), with
MALLOC_MMAP_THRESHOLD_=65536 so that freed blocks of 64 KiB and more go back to the
system and the resident set follows what is live. The child builds a run with the
engine (`prepare_run`: an MLP, AdamW), trains one step so that AdamW has its two
moments, migrates a fresh SQLite database and claims a job in it. Then it reads its
resident set (the baseline), resets the peak (`5` to /proc/self/clear_refs), saves one
checkpoint the way the worker does (`make_checkpoint`, `ProgressWriter.on_checkpoint`
into the database store or a directory store), and reads the peak (VmHWM). It reports
the growth over the baseline against the checkpoint's size (weights + optimizer state).

The `large` model has 54.6 M parameters (1024 features, four hidden layers of 4096):
218 MiB of weights, 655 MiB of checkpoint.

    .venv/bin/python bench/checkpoint_memory.py                  # about a minute
    .venv/bin/python bench/checkpoint_memory.py --size small --json

It only uses what the worker had before checkpoints were streamed (ProgressWriter,
make_checkpoint, the stores), so a copy of it in an older checkout measures that code.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import status_kib

ROOT = Path(__file__).resolve().parent.parent
MMAP_THRESHOLD = "65536"
STORES = ("database", "directory")

SIZES: dict[str, dict[str, Any]] = {
    "large": {"hidden_sizes": [4096, 4096, 4096, 4096], "n_features": 1024},
    "small": {"hidden_sizes": [2048, 2048, 2048], "n_features": 64},
}


def make_spec(size: str) -> dict[str, Any]:
    shape = SIZES[size]
    return {
        "model": {"type": "mlp", "hidden_sizes": shape["hidden_sizes"]},
        "dataset": {
            "type": "synthetic-classification",
            "n_classes": 10,
            "n_features": shape["n_features"],
            "n_samples": 16,
            "eval_fraction": 0.0,
        },
        "micro_batch_size": 8,
        "accumulation_steps": 1,
        "max_steps": 1,
        "optimizer": {"type": "adamw", "lr": 0.001},
        "device": "cpu",
    }


# ---------------------------------------------------------------- the child


class NoPublisher:
    """The live doorbell, rung nowhere: this measures the save, not Redis."""

    def publish(self, job_id: str, events: list[dict[str, Any]]) -> None:
        pass


def child(args: argparse.Namespace) -> None:
    """Save one checkpoint and print what it measured as one JSON line."""
    sys.path.insert(0, str(ROOT))  # the checkout this copy of the script lives in
    import gc
    from typing import cast

    import torch

    import app
    from app.blobs import DatabaseStore, DirectoryStore
    from app.checkpoints.models import Checkpoint as StoredCheckpoint
    from app.db import Database, upgrade
    from app.jobs import runs
    from app.jobs import service as jobs_service
    from app.jobs.spec import JobSpec
    from worker.engine.trainer import drive, make_checkpoint, prepare_run
    from worker.lease import LeaseKeeper
    from worker.live import LivePublisher
    from worker.progress_writer import ProgressWriter

    torch.set_num_threads(1)
    spec = JobSpec.model_validate(make_spec(args.size))
    run = prepare_run(spec)
    drive(run)  # one step: AdamW's moments exist
    parameters = sum(parameter.numel() for parameter in run.parts.model.parameters())

    with tempfile.TemporaryDirectory(prefix="checkpoint-memory-") as scratch:
        url = f"sqlite:///{Path(scratch) / 'trainjob.db'}"
        upgrade(url)
        database = Database(url)
        with database.session() as session:
            job = jobs_service.create_job(session, spec=spec)
            claim = runs.claim_job(session, job_id=job.id, worker="bench", lease_timeout=600)
            session.commit()
        assert claim is not None
        store = (
            DatabaseStore() if args.store == "database" else DirectoryStore(Path(scratch) / "ckpt")
        )
        keeper = LeaseKeeper(database, claim, heartbeat_seconds=600, max_runtime_seconds=None)
        writer = ProgressWriter(
            database,
            claim,
            store,
            cast(LivePublisher, NoPublisher()),
            keeper,
            flush_seconds=60.0,
            give_up_seconds=5.0,
        )
        writer.flush(required=True)
        gc.collect()
        baseline = status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        saved = make_checkpoint(run, None)
        writer.on_checkpoint(saved)
        release = getattr(saved, "release", None)  # what the trainer does after the callback
        if release is not None:
            release()
        del saved
        gc.collect()
        peak = status_kib("VmHWM")
        after = status_kib("VmRSS")
        with database.session() as session:
            row = session.query(StoredCheckpoint).one()
            size_bytes = row.size_bytes
        database.dispose()
    print(
        json.dumps(
            {
                "store": args.store,
                "code": str(Path(app.__file__).resolve().parent.parent),
                "parameters": parameters,
                "checkpoint_bytes": size_bytes,
                "baseline_kib": baseline,
                "peak_kib": peak,
                "after_kib": after,
            }
        ),
        flush=True,
    )


# ---------------------------------------------------------------- the parent


def measure(size: str, store: str) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child"]
    command += ["--size", size, "--store", store]
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
    finished = subprocess.run(
        command, env=environment, capture_output=True, text=True, check=False, cwd=ROOT
    )
    if finished.returncode != 0:
        raise SystemExit(f"child ({store}) failed:\n{finished.stderr}")
    measured: dict[str, Any] = json.loads(finished.stdout.strip().splitlines()[-1])
    measured["growth_bytes"] = (measured["peak_kib"] - measured["baseline_kib"]) * 1024
    measured["growth_ratio"] = measured["growth_bytes"] / measured["checkpoint_bytes"]
    return measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="large")
    parser.add_argument("--store", choices=STORES, action="append")
    parser.add_argument("--json", action="store_true", help="one JSON line per store")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.store = (args.store or ["database"])[0]
        child(args)
        return 0
    for store in args.store or STORES:
        measured = measure(args.size, store)
        if args.json:
            print(json.dumps(measured), flush=True)
            continue
        mib = 2**20
        print(
            f"{store:9} {measured['parameters'] / 1e6:.1f} M parameters, checkpoint "
            f"{measured['checkpoint_bytes'] / mib:.0f} MiB: baseline "
            f"{measured['baseline_kib'] / 1024:.0f} MiB, peak {measured['peak_kib'] / 1024:.0f} "
            f"MiB, growth {measured['growth_bytes'] / mib:.0f} MiB "
            f"({measured['growth_ratio']:.2f} x the checkpoint), after the save "
            f"{measured['after_kib'] / 1024:.0f} MiB  [{measured['code']}]",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
