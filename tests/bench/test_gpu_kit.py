"""bench/gpu.sh and bench/gpu.py: the dry run reports every part, a part that overruns its
limit is killed and reported as a timeout (with what it left behind), and the CUDA
lane's JUnit report becomes its summary.

No thresholds: the dry run's figures come from toy sizes on a shared CPU.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
PARTS = ("cuda-lane", "throughput", "memory", "dispatch")


def import_kit() -> ModuleType:
    """bench/gpu.py as a module (bench/ is a folder of scripts, not a package)."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    import gpu

    return gpu


def summary_rows(report: str) -> dict[str, list[str]]:
    """The report's summary table: part -> [status, seconds, key figures]."""
    rows = {}
    for line in report.split("## Summary", 1)[1].split("\n## ", 1)[0].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if cells[0] in PARTS:
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_dry_run_reports_every_part_with_a_status_and_its_figures(tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    started = time.monotonic()
    finished = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run", "--report", str(report)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    seconds = time.monotonic() - started
    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-4000:]
    text = report.read_text()
    assert text in finished.stdout  # printed as well as written
    rows = summary_rows(text)
    assert set(rows) == set(PARTS), text
    # No GPU here: the lane skips (or is absent until tests/cuda/ lands), the rest run.
    assert rows["cuda-lane"][0] == "skipped"
    assert rows["cuda-lane"][2]  # with its reason
    for part in PARTS[1:]:
        assert rows[part][0] == "ok", rows[part]
    assert re.search(r"engine/hand [0-9.]+-[0-9.]+; engine [0-9,]+ tokens/s", rows["throughput"][2])
    assert "MFU n/a" in rows["throughput"][2]  # no card, no peak
    assert re.search(r"\(2,2\) [0-9,]+ MiB vs \(4,1\) [0-9,]+ MiB", rows["memory"][2])
    assert "largest batch 4 without accumulation, 8 with (k=2)" in rows["memory"][2]
    assert re.search(r"submit -> first step median [0-9,]+ ms", rows["dispatch"][2])
    for part in PARTS:
        assert f"## {part}: " in text
    # The closing summary names every part with its status.
    closing = finished.stdout.rsplit("summary:", 1)[1].split("\n")
    assert [line.split()[:2] for line in closing if line.strip()] == [
        [part, rows[part][0]] for part in PARTS
    ]
    # Every part's total stays within the budget the kit gives itself.
    assert seconds < import_kit().BUDGET["dry"] + 60


# A part that would run for a minute and leaves a process of its own session behind: it
# must end at its limit, and take that process with it.
OVERRUNNING_PART = """
import subprocess, sys, time
from pathlib import Path
stray = subprocess.Popen(["sleep", "120"], start_new_session=True)
Path(sys.argv[1]).write_text(str(stray.pid))
time.sleep(60)
"""


def test_a_part_overrunning_its_limit_is_killed_and_reported_as_a_timeout(
    tmp_path: Path,
) -> None:
    # In a child: the kit becomes a subreaper, which pytest's own process must not.
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(ROOT / "bench")!r})
        import gpu
        from pathlib import Path
        gpu.become_subreaper()
        work = Path({str(tmp_path)!r})
        part = gpu.Part(
            "overrun",
            "a part that overruns",
            [sys.executable, "-c", {OVERRUNNING_PART!r}, str(work / "stray.pid")],
            lambda finished, log, figures: gpu.Outcome("ok", "should not get here"),
        )
        [result] = gpu.run_all([part], {{"overrun": 1}}, budget=60, work=work)
        print(json.dumps({{
            "status": result.outcome.status,
            "figures": result.outcome.key_figures,
            "seconds": result.finished.seconds,
            "strays": result.finished.strays,
        }}))
        """
    )
    started = time.monotonic()
    finished = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert finished.returncode == 0, finished.stderr
    assert time.monotonic() - started < 30  # not the part's minute
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    assert result["status"] == "timeout"
    assert result["figures"] == "timeout after 1 s"
    assert 1 <= result["seconds"] < 1 + import_kit().GRACE_SECONDS
    assert result["strays"] == 1
    stray = int((tmp_path / "stray.pid").read_text())
    assert not process_alive(stray)


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def junit_of(tmp_path: Path, body: str) -> Path:
    """The JUnit report of a pytest run of `body`, outside this project's configuration."""
    (tmp_path / "test_lane.py").write_text(textwrap.dedent(body))
    junit = tmp_path / "lane.xml"
    alone = ["-c", "/dev/null", "-p", "no:cacheprovider", "--rootdir", str(tmp_path)]
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *alone, "--junitxml", str(junit), "test_lane.py"],
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
    )
    return junit


def test_a_lane_that_skips_is_skipped_with_its_reason_and_one_that_fails_fails(
    tmp_path: Path,
) -> None:
    gpu = import_kit()
    log = tmp_path / "lane.log"
    log.write_text("")
    skipping = junit_of(
        tmp_path,
        """
        import pytest
        @pytest.mark.skip(reason="CUDA is not available")
        def test_one(): pass
        @pytest.mark.skip(reason="CUDA is not available")
        def test_two(): pass
        """,
    )
    outcome = gpu.summarise_lane(True)(gpu.Finished(0, 1.0, 60), log, skipping)
    assert outcome.status == "skipped"
    assert outcome.key_figures.startswith("0 passed, 0 failed, 2 skipped")
    assert "CUDA is not available" in outcome.key_figures

    failing = junit_of(tmp_path, "def test_one(): pass\ndef test_two(): assert False\n")
    outcome = gpu.summarise_lane(False)(gpu.Finished(1, 1.0, 60), log, failing)
    assert (outcome.status, outcome.key_figures) == ("failed", "1 passed, 1 failed, 0 skipped")


def test_an_absent_lane_is_skipped_in_a_dry_run_and_fails_a_gpu_run(tmp_path: Path) -> None:
    gpu = import_kit()
    log = tmp_path / "lane.log"
    log.write_text("no tests ran in 0.1s\n")
    absent = gpu.Finished(5, 1.0, 60)  # pytest's "no tests collected"
    assert gpu.summarise_lane(True)(absent, log, tmp_path / "none.xml").status == "skipped"
    assert gpu.summarise_lane(False)(absent, log, tmp_path / "none.xml").status == "failed"


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H200", 989),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA L4", 121),
        ("NVIDIA L40S", 362),
        ("NVIDIA A10", 125),
        ("NVIDIA GeForce RTX 4090", 165),
        ("NVIDIA A10G", None),
        ("Tesla T4", None),
    ],
)
def test_the_peak_of_a_card_is_looked_up_by_name_and_unknown_cards_have_none(
    name: str, tflops: float | None
) -> None:
    gpu = import_kit()
    card = gpu.Card("2.13.0", "12.8", name, 80.0, True)
    assert card.peak_tflops == tflops
    expected = "n/a" if tflops is None else f"{6 * 1e9 * 1e4 / (tflops * 1e12):.1%}"
    assert gpu.mfu(1e4, 10**9, card) == expected
