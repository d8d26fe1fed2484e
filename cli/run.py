"""`trainjob run`: train one spec in the foreground, writing weights, metrics and checkpoints.

Layout of the output directory:
    spec.json                 the normalised spec (what --resume continues)
    metrics.jsonl             one JSON object per optimizer step
    events.jsonl              oom_backoff, overflow_skip, checkpoint, ... events
    checkpoints/step-NNNNNNN/ weights.safetensors + state.pt, one per checkpoint (a LoRA
                              run's weights are its adapter's; its last one also has
                              merged.safetensors)
    weights.safetensors       the final weights, once the run completes (a LoRA run's:
                              the base model with the adapter merged in)
    adapter/                  a LoRA run's adapter as peft saves it, once the run
                              completes: adapter_model.safetensors + adapter_config.json
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import torch.distributed as dist
from pydantic import ValidationError

from app.jobs.spec import JobSpec, validation_messages
from app.settings import get_settings
from cli.progress import TrainingProgress
from cli.specfile import SpecFileError, read_spec
from worker.engine.checkpoint import STATE_FILE, Checkpoint, LiveCheckpoint
from worker.engine.distributed import RankGroup, join_group
from worker.engine.errors import TrainingError
from worker.engine.hf import HfLimits
from worker.engine.trainer import Callbacks, StepMetrics, train
from worker.group import launch_environment, launcher_command
from worker.parent_death import dies_with

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
# A LoRA run's adapter, loadable with peft.PeftModel.from_pretrained(base, DIR/adapter).
ADAPTER_DIR = "adapter"


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metrics past the checkpoint: the resumed run writes those steps again."""
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line)["step"] <= last_step
    ]
    path.write_text("".join(line + "\n" for line in kept))


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"trainjob run: {message}", file=sys.stderr)
    return code


def load_spec_file(path: Path) -> JobSpec:
    try:
        return JobSpec.model_validate(read_spec(path))
    except ValidationError as error:
        raise SpecFileError(path, validation_messages(error)) from error


def resolve_spec(spec_path: Path | None, resume: Path | None) -> JobSpec:
    stored = resume / "spec.json" if resume is not None else None
    if spec_path is None:
        if stored is None:
            raise SpecFileError(Path("-"), ["give a SPEC file, or --resume DIR"])
        return load_spec_file(stored)
    spec = load_spec_file(spec_path)
    if stored is not None and stored.exists() and load_spec_file(stored) != spec:
        raise SpecFileError(
            spec_path, [f"{spec_path} differs from the spec the run in {resume} used"]
        )
    return spec


def on_devices(spec: JobSpec, devices: int) -> JobSpec:
    """`spec` on `devices` devices: the same batch and micro-batch, so the same training
    (a checkpoint resumes on any number of devices); accumulation_steps follows."""
    if devices == spec.devices:
        return spec
    data = spec.model_dump(mode="json")
    if spec.micro_batch_size != "auto":
        data["accumulation_steps"] = None
    try:
        return JobSpec.model_validate({**data, "devices": devices})
    except ValidationError as error:
        raise SpecFileError(Path("--devices"), validation_messages(error)) from error


def run_command(
    spec_path: Path | None,
    out: Path | None,
    resume: Path | None,
    quiet: bool = False,
    devices: int | None = None,
) -> int:
    try:
        spec = resolve_spec(spec_path, resume)
        spec = on_devices(spec, devices or spec.devices)
    except SpecFileError as error:
        return _fail("\n  ".join([f"invalid spec {error.path}:", *error.lines]))
    out = resume or out
    if out is None:
        return _fail("give --out DIR (or --resume DIR)")
    checkpoint: Checkpoint | None = None
    if resume is not None:
        complete = sorted((resume / "checkpoints").glob("step-*/" + STATE_FILE))
        if not complete:
            return _fail(f"{resume} has no checkpoint to resume from")
        checkpoint = Checkpoint.read(complete[-1].parent)
        _truncate_metrics(out / "metrics.jsonl", checkpoint.step)
    elif out.exists() and any(out.iterdir()):
        return _fail(f"{out} already holds files; use --resume {out} or another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(spec.model_dump_json(indent=2) + "\n")
    if spec.devices > 1:
        return _train_on_devices(spec.devices, out, quiet)
    return _train(spec, out, checkpoint, quiet)


# Files of a run on several devices, in its directory: Ctrl-C's stop request, which rank 0
# reads before each window, and rank 0's exit code.
STOP_FILE, EXIT_FILE = ".stop", ".exit-code"


def _train_on_devices(devices: int, out: Path, quiet: bool) -> int:
    """Rank 0 and the others (rank_main below) under torch.distributed.run, in a session
    of their own: the first Ctrl-C asks rank 0 to stop after a checkpoint, the second
    stops them all at once."""
    for name in (STOP_FILE, EXIT_FILE):
        (out / name).unlink(missing_ok=True)
    arguments = [str(out), "quiet" if quiet else "bar"]
    launcher = subprocess.Popen(
        launcher_command(devices, "cli.run", arguments),
        env=launch_environment(devices),
        start_new_session=True,
    )

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        if (out / STOP_FILE).exists():
            os.killpg(launcher.pid, signal.SIGTERM)
        (out / STOP_FILE).touch()

    previous_handler = signal.signal(signal.SIGINT, on_sigint)
    try:
        launcher.wait()
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    exit_file = out / EXIT_FILE
    if not exit_file.exists():
        return _fail(f"a rank of the {devices} failed (its error is above)", EXIT_FAILED)
    code = int(exit_file.read_text())
    exit_file.unlink()
    return code


def rank_main(argv: list[str]) -> int:
    """One rank of `trainjob run` on several devices: rank 0 trains and reports as a run
    on one device does, the others train their share of each window."""
    out, quiet = Path(argv[0]), argv[1] == "quiet"
    dies_with(os.getppid(), signal.SIGKILL)()  # never outlive the launcher
    group = join_group(timedelta(minutes=5), timedelta(hours=1))
    try:
        spec = load_spec_file(out / "spec.json")
        complete = sorted((out / "checkpoints").glob("step-*/" + STATE_FILE))
        checkpoint = Checkpoint.read(complete[-1].parent) if complete else None
        if group.rank == 0:
            code = _train(spec, out, checkpoint, quiet, group)
            (out / EXIT_FILE).write_text(str(code))
            return 0
        with contextlib.suppress(TrainingError):  # met by every rank at once: rank 0 says it
            train(
                spec,
                resume=checkpoint,
                hf_limits=_hf_limits(),
                group=group,
                deterministic=get_settings().deterministic,
            )
        return 0
    finally:
        dist.destroy_process_group()


def _hf_limits() -> HfLimits:
    return HfLimits(get_settings().hf_model_dirs, get_settings().hf_max_parameters)


def _train(
    spec: JobSpec,
    out: Path,
    checkpoint: Checkpoint | None,
    quiet: bool,
    group: RankGroup | None = None,
) -> int:
    stop_reason: str | None = None

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        """Ctrl-C asks the loop to stop at the next window boundary, after a checkpoint."""
        nonlocal stop_reason
        if stop_reason is not None:
            raise KeyboardInterrupt  # a second Ctrl-C does not wait
        stop_reason = "interrupted"

    previous_handler = signal.signal(signal.SIGINT, on_sigint)
    bar: TrainingProgress | None = None
    metrics_file = (out / "metrics.jsonl").open("a", buffering=1)
    events_file = (out / "events.jsonl").open("a")

    def on_start(done: int, total: int) -> None:
        nonlocal bar
        if not quiet:
            bar = TrainingProgress(total_steps=total, batch_size=spec.window_size, file=sys.stderr)

    def on_step(metrics: StepMetrics) -> None:
        metrics_file.write(json.dumps(metrics.to_dict()) + "\n")
        if bar is not None:
            bar.update(metrics.step, metrics.loss, metrics.samples_per_sec)

    def on_event(kind: str, data: dict[str, Any]) -> None:
        events_file.write(json.dumps({"type": kind, "data": data}) + "\n")
        events_file.flush()

    def on_checkpoint(saved: LiveCheckpoint) -> None:
        metrics_file.flush()
        saved.write(out / "checkpoints" / f"step-{saved.step:07d}")

    def should_stop() -> str | None:
        if group is not None and (out / STOP_FILE).exists():  # Ctrl-C at the launching CLI
            return "interrupted"
        return stop_reason

    callbacks = Callbacks(on_start, on_step, on_event, on_checkpoint, should_stop)
    try:
        result = train(
            spec,
            callbacks,
            resume=checkpoint,
            hf_limits=_hf_limits(),
            group=group,
            deterministic=get_settings().deterministic,
        )
    except TrainingError as error:
        return _fail(f"{error.type}: {error.message}", EXIT_FAILED)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        metrics_file.close()
        events_file.close()
        if bar is not None:
            bar.close()
    if result.status == "stopped":
        print(
            f"stopped at step {result.step}/{result.total_steps} after a checkpoint; "
            f"continue with: trainjob run --resume {out}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    (out / "weights.safetensors").write_bytes(result.weights)
    adapter = result.adapter
    written = f"weights in {out / 'weights.safetensors'}"
    if adapter is not None:
        adapter_bytes, config = adapter
        (out / ADAPTER_DIR).mkdir(exist_ok=True)
        (out / ADAPTER_DIR / "adapter_model.safetensors").write_bytes(adapter_bytes)
        config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        (out / ADAPTER_DIR / "adapter_config.json").write_text(config_text)
        written = f"merged weights in {out / 'weights.safetensors'}, adapter in {out / ADAPTER_DIR}"
    loss = f" loss {result.last_metrics.loss:.4f}" if result.last_metrics else ""
    print(f"done: {result.step} steps,{loss}; {written}")
    return EXIT_OK


if __name__ == "__main__":  # a rank, as torch.distributed.run starts it
    sys.exit(rank_main(sys.argv[1:]))
