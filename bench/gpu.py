"""The GPU kit: the CUDA test lane and the GPU benchmarks in one unattended run, one report.

Run it through bench/gpu.sh, which first installs what it needs into ./.venv
(scripts/install.sh with the `dev` and `cuda` extras; pip's torch is a CUDA build there):

    bash bench/gpu.sh                          # on a GPU machine: under 8 minutes
    bash bench/gpu.sh --dry-run                # on CPU: every part at toy size, ~1 minute
    bash bench/gpu.sh --report /tmp/gpu.md --only throughput memory
    bash bench/gpu.sh --timeout cuda-lane=300  # a part's own limit, in seconds

Each part runs in a child process of its own (its own process group), with a limit:
an overrun part's group is sent SIGTERM, then SIGKILL after a short grace, and the part
is reported as "timeout after N s". This process is a child subreaper (Linux), so a
process a part left behind in a session of its own is found and killed as well. The
limits fit a total budget (`--budget`, 470 s: the parts of a GPU run end within 8
minutes, whatever they do); time a part leaves unused goes to the later ones.

1. cuda-lane: `pytest -m cuda` (tests/cuda/): passed, failed, skipped. On CPU it is
   reported as skipped with pytest's reason (the lane skips without CUDA), and as
   "lane absent" when nothing is marked `cuda`.
2. throughput: bench/loop.py on CUDA in bf16: the engine against the hand loop,
   accelerate and Lightning, tiny-gpt at 12 layers, width 768, sequence 512, m in
   {4, 16}, k in {1, 8}; ratios to the hand loop from the same rounds, tokens/s, and
   the model FLOPs utilisation 6 · parameters · tokens/s over the card's dense bf16
   peak (PEAK_BF16_TFLOPS; an unknown card: "n/a").
3. memory: bench/memory.py on that model: torch.cuda.max_memory_allocated at (4, k)
   against (4·k, 1), and the largest batch that trains with and without accumulation
   (doubling, then bisecting, a child per probe).
4. dispatch: bench/dispatch.py: `trainjob serve` on embedded defaults (no PostgreSQL,
   no Redis server), jobs with `device: "cuda"`: submit -> claim -> first optimizer step.

The report (Markdown: machine, card, a summary table, each part's figures and the end
of its output) goes to `--report` (default bench/out/gpu-report-<time>.md; the parts'
logs, JSON and plot beside it in <report>-files/), and is printed. The exit status is 1
when a part failed or ran out of time, 2 when the kit could not start.

`--dry-run` runs the same parts on the CPU at toy size (a one-layer model, sequence
32, one round, fp32) so that CI keeps the kit working (tests/bench/test_gpu_kit.py).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import machine_lines

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PYTHON = sys.executable

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, in TFLOPs; the
# first pattern that matches torch.cuda.get_device_name() wins.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    (r"H100.*PCIe", 756),
    (r"H100 NVL", 835),
    (r"H100|H200", 989),
    (r"A100", 312),
    (r"L40S", 362),
    (r"\bL4\b", 121),
    (r"\bA10\b", 125),
    (r"RTX 4090", 165),
]

# Seconds: a part's own limit, and what it keeps for itself from the budget of the parts
# before it (so that a slow early part cannot starve the later ones to nothing).
LIMITS = {
    "full": {"cuda-lane": 240, "throughput": 180, "memory": 150, "dispatch": 90},
    "dry": {"cuda-lane": 90, "throughput": 90, "memory": 90, "dispatch": 90},
}
FLOORS = {"cuda-lane": 60, "throughput": 60, "memory": 45, "dispatch": 30}
BUDGET = {"full": 470, "dry": 240}
GRACE_SECONDS = 10  # between SIGTERM and SIGKILL of an overrun part
OUTPUT_TAIL_LINES = 40

_PR_SET_CHILD_SUBREAPER = 36


# ------------------------------------------------------------------ running one part


@dataclass
class Finished:
    """How a part's process ended: exit status (None: killed at its limit), seconds,
    and the processes it left behind (killed)."""

    returncode: int | None
    seconds: float
    timeout: float
    strays: int = 0

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def become_subreaper() -> None:
    """Orphans of our descendants become our children, not init's: a part's process that
    started a session of its own can still be found (and killed) through /proc."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, frontier = set(), [pid]
    while frontier:
        for child in children.get(frontier.pop(), []):
            found.add(child)
            frontier.append(child)
    return found


def kill_strays() -> int:
    """SIGKILL whatever still runs below us (and reap it); how many there were."""
    killed: set[int] = set()
    deadline = time.monotonic() + 10
    while (left := descendants(os.getpid())) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed |= left
        reap()
        time.sleep(0.05)  # killed parents' children are handed to us a moment later
    reap()
    return len(killed)


def reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] != 0:
            pass


def run_part(command: Sequence[str], timeout: float, log: Path) -> Finished:
    """Run `command` in a process group of its own, output to `log`, for at most
    `timeout` seconds: then SIGTERM to the group, SIGKILL after GRACE_SECONDS."""
    started = time.monotonic()
    with log.open("wb") as output:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    returncode: int | None
    try:
        returncode = process.wait(timeout)
    except subprocess.TimeoutExpired:
        returncode = None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    with contextlib.suppress(ProcessLookupError):  # the part's group, leader gone or not
        os.killpg(process.pid, signal.SIGKILL)
    strays = kill_strays()
    return Finished(returncode, time.monotonic() - started, timeout, strays)


# ------------------------------------------------------------------ the parts


@dataclass
class Outcome:
    """What the report says of a part."""

    status: str  # ok, failed, timeout, skipped
    key_figures: str
    details: list[str] = field(default_factory=list)  # Markdown lines


@dataclass(frozen=True)
class Card:
    """What the probe found: torch's build and the GPU, if any."""

    torch: str
    cuda_build: str | None
    name: str | None
    memory_gib: float | None
    nvidia_device_nodes: bool

    @property
    def peak_tflops(self) -> float | None:
        for pattern, tflops in PEAK_BF16_TFLOPS:
            if self.name and re.search(pattern, self.name):
                return tflops
        return None

    def describe(self) -> str:
        if self.name is None:
            build = f"CUDA {self.cuda_build} build" if self.cuda_build else "CPU build"
            return f"no CUDA device (torch {self.torch}, {build})"
        peak = f"{self.peak_tflops:g} TFLOPs" if self.peak_tflops else "n/a (not in the table)"
        return (
            f"{self.name}, {self.memory_gib:.1f} GiB, torch {self.torch} (CUDA "
            f"{self.cuda_build}), dense bf16 peak {peak}"
        )


PROBE = """
import json, torch
cuda = torch.cuda.is_available()
print(json.dumps({
    "torch": torch.__version__,
    "cuda_build": torch.version.cuda,
    "name": torch.cuda.get_device_name(0) if cuda else None,
    "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
}))
"""


def probe_card() -> Card:
    finished = subprocess.run(
        [PYTHON, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        stdin=subprocess.DEVNULL,
    )
    found = json.loads(finished.stdout.strip().splitlines()[-1])
    nodes = any(Path("/dev").glob("nvidia[0-9]*"))
    return Card(**found, nvidia_device_nodes=nodes)


@dataclass(frozen=True)
class Part:
    name: str
    title: str
    command: list[str]
    summarise: Callable[[Finished, Path, Path], Outcome]  # (finished, log, figures JSON)


def output_tail(log: Path, lines: int = OUTPUT_TAIL_LINES) -> list[str]:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


def read_figures(path: Path) -> dict[str, Any] | None:
    try:
        figures: dict[str, Any] = json.loads(path.read_text())
        return figures
    except (OSError, ValueError):
        return None


def failed(finished: Finished, log: Path, what: str = "") -> Outcome:
    tail = output_tail(log, 3)
    last = tail[-1].strip() if tail else ""
    return Outcome("failed", f"exit status {finished.returncode}{what}: {last}"[:300])


def summarise_lane(dry_run: bool) -> Callable[[Finished, Path, Path], Outcome]:
    def summarise(finished: Finished, log: Path, junit: Path) -> Outcome:
        output = log.read_text(errors="replace") if log.exists() else ""
        absent = finished.returncode == 5 or "Unknown marker(s)" in output
        if absent:
            reason = "lane absent: no test is marked cuda"
            return Outcome("skipped" if dry_run else "failed", reason)
        counts = junit_counts(junit)
        if counts is None:
            return failed(finished, log, " (no JUnit report)")
        passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        figures = (
            f"{passed} passed, {counts['failures'] + counts['errors']} failed, "
            f"{counts['skipped']} skipped"
        )
        reasons = sorted(set(counts["reasons"]))
        details = [f"- skipped because: {reason}" for reason in reasons[:5]]
        if finished.returncode not in (0, None):
            return Outcome("failed", figures, details)
        if passed == 0 and counts["skipped"]:
            return Outcome("skipped", f"{figures}: {reasons[0] if reasons else ''}", details)
        return Outcome("ok", figures, details)

    return summarise


def junit_counts(path: Path) -> dict[str, Any] | None:
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts: dict[str, Any] = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in ("tests", "failures", "errors", "skipped"):
            counts[key] += int(suite.get(key, 0))
    counts["reasons"] = [
        skipped.get("message", "") for skipped in root.iter("skipped") if skipped.get("message")
    ]
    return counts


def mfu(tokens_per_second: float, parameters: int, card: Card) -> str:
    if card.peak_tflops is None:
        return "n/a"
    return f"{6 * parameters * tokens_per_second / (card.peak_tflops * 1e12):.1%}"


def summarise_throughput(card: Card) -> Callable[[Finished, Path, Path], Outcome]:
    def summarise(finished: Finished, log: Path, path: Path) -> Outcome:
        figures = read_figures(path)
        if figures is None:
            return failed(finished, log, " (no figures)")
        rows = []
        for point in figures["points"]:
            rates, ratios = point["samples_per_second"], point["ratio_to_hand"]
            tokens = point["tokens_per_sample"]
            rows.append(
                [
                    str(point["micro_batch_size"]),
                    str(point["accumulation_steps"]),
                    *(f"{ratios[name]:.3f}" for name in ("engine", "accelerate", "lightning")),
                    f"{rates['engine'] * tokens:,.0f}",
                    f"{rates['hand'] * tokens:,.0f}",
                    mfu(rates["engine"] * tokens, point["parameters"], card),
                    mfu(rates["hand"] * tokens, point["parameters"], card),
                    f"{point['checkpoint_ms']:.0f}",
                    f"{point['weight_difference']:.1e}",
                ]
            )
        header = ["m", "k", "engine/hand", "accelerate/hand", "lightning/hand"]
        header += ["engine tokens/s", "hand tokens/s", "engine MFU", "hand MFU"]
        header += ["ckpt ms", "max |Δw|/max|w|"]
        first = figures["points"][0]
        model = first["model"]
        details = [
            f"tiny-gpt {model['n_layer']} layers, width {model['n_embd']}, sequence "
            f"{model['block_size']}, {first['parameters']:,} parameters; "
            f"{figures['device']}, {figures['precision']}, {figures['rounds']} rounds "
            "(ratios: medians of each round's ratio to the hand loop, by wall clock); "
            "MFU = 6 · parameters · tokens/s ÷ the card's dense bf16 peak",
            "",
            *markdown_table(header, rows),
        ]
        engine = [point["ratio_to_hand"]["engine"] for point in figures["points"]]
        best = max(
            figures["points"],
            key=lambda p: p["samples_per_second"]["engine"] * p["tokens_per_sample"],
        )
        best_tokens = best["samples_per_second"]["engine"] * best["tokens_per_sample"]
        key = (
            f"engine/hand {min(engine):.2f}-{max(engine):.2f}; engine {best_tokens:,.0f} "
            f"tokens/s at m={best['micro_batch_size']} k={best['accumulation_steps']}, "
            f"MFU {mfu(best_tokens, best['parameters'], card)}"
        )
        if finished.returncode != 0:
            return Outcome("failed", key + "; weights differ from the hand loop's", details)
        return Outcome("ok", key, details)

    return summarise


def summarise_memory(finished: Finished, log: Path, path: Path) -> Outcome:
    figures = read_figures(path)
    if figures is None or finished.returncode != 0:
        return failed(finished, log, "" if figures is None else " (figures written)")
    unit, m = figures["unit"], figures["micro_batch_size"]
    rows = [
        [
            str(point["accumulation_steps"]),
            f"{point['accumulated_peak_mib']:,.1f}",
            (
                f"{point['single_peak_mib']:,.1f}"
                if point["single_peak_mib"] is not None
                else f"does not fit ({point['single_does_not_fit']})"
            ),
        ]
        for point in figures["points"]
    ]
    last = figures["points"][-1]
    k = last["accumulation_steps"]
    single = last["single_peak_mib"]
    key = f"({m},{k}) {last['accumulated_peak_mib']:,.0f} MiB vs ({m * k},1) " + (
        f"{single:,.0f} MiB" if single is not None else "does not fit"
    )
    details = [
        f"{unit} ({figures['device']}, {figures['precision']}), m = {m}, the same global "
        "batch m·k in both columns",
        "",
        *markdown_table(["k", f"(m,k) {unit}", f"(m·k,1) {unit}"], rows),
    ]
    search = figures["search"]
    if search is not None:
        accumulated = search["accumulated"]
        key += f"; largest batch {search['largest']} without accumulation"
        details += [
            "",
            f"largest batch that trains without accumulation: {search['largest']} "
            f"(the next size up: {search['stopped_by']})",
        ]
        if accumulated is not None:
            batch = accumulated["micro_batch_size"] * accumulated["accumulation_steps"]
            trains = "trains" if accumulated["fits"] else f"does not ({accumulated['reason']})"
            peak = accumulated["peak_mib"]
            key += f", {batch} with (k={accumulated['accumulation_steps']})"
            details.append(
                f"with accumulation: {batch} (m={accumulated['micro_batch_size']}, "
                f"k={accumulated['accumulation_steps']}) {trains}"
                + (f", peak {peak:,.1f} MiB" if peak is not None else "")
                + "; the peak does not grow with k: beyond this, time and the spec's "
                "batch_size bound it, not memory"
            )
    return Outcome("ok", key, details)


def summarise_dispatch(finished: Finished, log: Path, path: Path) -> Outcome:
    figures = read_figures(path)
    if figures is None:
        return failed(finished, log, " (no figures)")
    jobs = figures["jobs"]
    rows = [
        [
            job["id"],
            job["status"],
            f"{job['claim_ms']:,.0f}" if job["claim_ms"] is not None else "-",
            f"{job['first_step_ms']:,.0f}" if job["first_step_ms"] is not None else "-",
        ]
        for job in jobs
    ]
    firsts = [job["first_step_ms"] for job in jobs if job["first_step_ms"] is not None]
    claims = [job["claim_ms"] for job in jobs if job["claim_ms"] is not None]
    key = f"{len(jobs)} jobs on {figures['device']}"
    if firsts:
        key += f"; submit -> first step median {statistics.median(firsts):,.0f} ms"
    if claims:
        key += f", submit -> claim median {statistics.median(claims):,.0f} ms"
    details = [
        "`trainjob serve` on embedded defaults; each job submitted on an idle worker; "
        "first step: the first metric's time (the worker's clock) - created_at",
        "",
        *markdown_table(["job", "status", "submit -> claim ms", "submit -> first step ms"], rows),
    ]
    if figures["preloads"]:
        details.append(
            f"\na pool child loads the engine in {statistics.median(figures['preloads']):.2f} s "
            "(median), before it takes a job"
        )
    status = "ok" if finished.returncode == 0 and jobs else "failed"
    return Outcome(status, key, details)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]


def plan(dry_run: bool, card: Card, work: Path) -> list[Part]:
    """The four parts: GPU sizes, or (dry run) toy sizes on the CPU."""
    device, precision = ("cpu", "fp32") if dry_run else ("cuda", "bf16")
    if dry_run:
        loop = ["--sizes", "smoke", "--sequence", "32", "--m", "2", "4", "--k", "1", "2"]
        loop += ["--rounds", "1", "--micro-batches", "4", "--checkpoint-every", "2"]
        memory = ["--size", "gpt-smoke", "--k", "1", "2", "--steps", "1"]
        memory += ["--search-max", "4", "--search-k", "2"]
        jobs = "1"
    else:
        loop = ["--sizes", "gpu", "--m", "4", "16", "--k", "1", "8", "--rounds", "2"]
        memory = ["--size", "gpu", "--k", "1", "4", "--search-k", "8", "--child-timeout", "60"]
        jobs = "3"
    common = ["--device", device, "--precision", precision]
    lane = ["-m", "pytest", "-m", "cuda", "-q", "-rs", "--junitxml", str(work / "cuda-lane.xml")]
    memory += ["--search", "--out", str(work / "memory.png")]
    return [
        Part(
            "cuda-lane", "CUDA test lane (pytest -m cuda)", [PYTHON, *lane], summarise_lane(dry_run)
        ),
        Part(
            "throughput",
            "Training throughput: engine vs hand loop vs accelerate vs Lightning (bench/loop.py)",
            bench_command("loop.py", *common, *loop, "--json", str(work / "throughput.json")),
            summarise_throughput(card),
        ),
        Part(
            "memory",
            "Memory: (m, k) vs (m·k, 1), and the largest batch that trains (bench/memory.py)",
            bench_command("memory.py", *common, *memory, "--json", str(work / "memory.json")),
            summarise_memory,
        ),
        Part(
            "dispatch",
            "Dispatch: submit -> first optimizer step through the embedded service "
            "(bench/dispatch.py)",
            bench_command(
                "dispatch.py", *common, "--jobs", jobs, "--json", str(work / "dispatch.json")
            ),
            summarise_dispatch,
        ),
    ]


def bench_command(script: str, *arguments: str) -> list[str]:
    return [PYTHON, str(BENCH / script), *arguments]


def figures_path(part: Part) -> Path:
    """Where the part writes its figures: the path after --json (--junitxml for pytest)."""
    for flag in ("--json", "--junitxml"):
        if flag in part.command:
            return Path(part.command[part.command.index(flag) + 1])
    raise ValueError(f"part {part.name} writes no figures")


# ------------------------------------------------------------------ the run


@dataclass
class Result:
    part: Part
    outcome: Outcome
    finished: Finished | None
    log: Path


def run_all(
    parts: Sequence[Part], limits: dict[str, float], budget: float, work: Path
) -> list[Result]:
    """Each part in turn, each within min(its limit, what the budget has left after
    keeping the later parts' floors)."""
    deadline = time.monotonic() + budget
    results = []
    for index, part in enumerate(parts):
        later = sum(FLOORS.get(other.name, 0) for other in parts[index + 1 :])
        timeout = min(limits[part.name], deadline - time.monotonic() - later)
        log = work / f"{part.name}.log"
        if timeout < 1:
            outcome = Outcome("timeout", "not started: the kit's time budget was spent")
            results.append(Result(part, outcome, None, log))
            continue
        print(f"== {part.name} (at most {timeout:.0f} s): {' '.join(part.command)}", flush=True)
        finished = run_part(part.command, timeout, log)
        if finished.timed_out:
            outcome = Outcome("timeout", f"timeout after {finished.timeout:.0f} s")
        else:
            try:
                outcome = part.summarise(finished, log, figures_path(part))
            except (KeyError, TypeError, ValueError, IndexError) as error:
                outcome = Outcome("failed", f"its figures could not be read: {error!r}")
        if finished.strays:
            outcome.details.append(f"\n{finished.strays} process(es) it left behind were killed")
        print(f"   {outcome.status} in {finished.seconds:.0f} s: {outcome.key_figures}", flush=True)
        results.append(Result(part, outcome, finished, log))
    return results


def report_lines(
    results: Sequence[Result], card: Card, dry_run: bool, command: str, total: float
) -> list[str]:
    mode = "dry run: CPU, toy sizes" if dry_run else "GPU"
    lines = [
        f"# GPU kit report ({mode}), {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"command: `{command}`",
        "",
        *(f"- {line}" for line in machine_lines(["torch", "accelerate", "lightning"])),
        f"- card: {card.describe()}",
        "",
        "## Summary",
        "",
        *markdown_table(
            ["part", "status", "seconds", "key figures"],
            [
                [
                    result.part.name,
                    result.outcome.status,
                    f"{result.finished.seconds:.0f}" if result.finished else "-",
                    result.outcome.key_figures,
                ]
                for result in results
            ],
        ),
        "",
        f"total {total:.0f} s",
    ]
    for result in results:
        lines += ["", f"## {result.part.name}: {result.part.title}", ""]
        lines += [f"status: **{result.outcome.status}**: {result.outcome.key_figures}", ""]
        lines += result.outcome.details
        tail = output_tail(result.log)
        if tail:
            lines += ["", f"end of its output ({result.log}):", "", "```", *tail, "```"]
    return lines


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes")
    parser.add_argument("--report", type=Path, help="the Markdown report to write")
    parser.add_argument("--only", nargs="+", choices=list(FLOORS), help="these parts only")
    parser.add_argument(
        "--timeout",
        action="append",
        default=[],
        metavar="PART=SECONDS",
        help="a part's own limit (repeatable)",
    )
    parser.add_argument("--budget", type=float, help="seconds for all parts together")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    mode = "dry" if args.dry_run else "full"
    limits: dict[str, float] = dict(LIMITS[mode])
    for item in args.timeout:
        name, _, seconds = item.partition("=")
        if name not in limits or not seconds.replace(".", "", 1).isdigit():
            print(f"gpu.py: --timeout {item}: give PART=SECONDS, PART one of {list(limits)}")
            return 2
        limits[name] = float(seconds)
    stamp = f"{datetime.now(UTC):%Y-%m-%d-%H%M}"
    report = args.report or BENCH / "out" / f"gpu-report-{stamp}.md"
    work = report.parent / f"{report.stem}-files"
    work.mkdir(parents=True, exist_ok=True)
    become_subreaper()
    started = time.monotonic()

    card = probe_card()
    print(f"card: {card.describe()}", flush=True)
    if not args.dry_run and card.name is None:
        why = "no CUDA device"
        if card.nvidia_device_nodes and card.cuda_build is None:
            why = (
                f"torch {card.torch} in .venv is a CPU build on a machine with an NVIDIA GPU: "
                "remove .venv (or set TORCH_REQUIREMENT) and run bench/gpu.sh again"
            )
        print(f"gpu.py: {why}; on a CPU machine run bench/gpu.sh --dry-run", file=sys.stderr)
        return 2

    parts = plan(args.dry_run, card, work)
    parts = [part for part in parts if not args.only or part.name in args.only]
    results = run_all(parts, limits, args.budget or BUDGET[mode], work)
    command = "bash bench/gpu.sh " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = report_lines(results, card, args.dry_run, command.strip(), time.monotonic() - started)
    report.write_text("\n".join(lines) + "\n")
    print()
    print("\n".join(lines))
    print()
    print(f"report: {report}")
    print("summary:")
    for result in results:
        print(f"  {result.part.name:<10} {result.outcome.status:<8} {result.outcome.key_figures}")
    bad = [result for result in results if result.outcome.status in ("failed", "timeout")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
