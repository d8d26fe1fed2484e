"""Acceptance: what validating and loading a hostile file allocates is bounded by what the
upload's size can honestly need.

An NPZ zip bomb (1 MB of deflated zeros that declares a 1 GiB array) is refused from
its header, quickly, and the peak memory of the process that validates it stays small.
The validation runs in a child process with MALLOC_MMAP_THRESHOLD_ set, as the upload
test does, so that its peak resident set (VmHWM) measures what it held, not what
malloc chose to keep.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from worker.datafiles.validate import MAX_NPZ_EXPANSION

MIB = 1024 * 1024
BOMB_ROWS = 1024 * MIB  # a 1 GiB int8 y, and an x of as many rows
MAX_PEAK_BYTES = 200 * MIB
MAX_SECONDS = 20.0

# Validates (or loads) the file in argv[1] and prints the report and the peak RSS: VmHWM,
# not ru_maxrss, which Linux carries over exec from the forking (pytest) process. A
# warm-up file in argv[4] is loaded first, so that what the first load allocates once
# (lazily imported modules, caches) is in the baseline rather than in the growth.
CHILD = """
import json, sys, time
from pathlib import Path

def peak():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

from worker.datafiles.validate import validate_file
if sys.argv[3] == "load":
    from app.jobs.spec import FileDatasetSpec
    from worker.datafiles.load import load_file_dataset
def load(path):
    return load_file_dataset(
        FileDatasetSpec(type="file", file_id="file_000000000000000000000001", eval_fraction=0.0),
        seed=0, source=lambda file_id: Path(path), tokenizer=None,
    )

if len(sys.argv) > 4:
    load(sys.argv[4])
baseline = peak()
began = time.monotonic()
if sys.argv[3] == "validate":
    report = validate_file(Path(sys.argv[1]), sys.argv[2])
    outcome = {"status": report.status, "errors": report.errors, "stats": report.stats}
else:
    splits = load(sys.argv[1])
    outcome = {"rows": len(splits.train)}
outcome["seconds"] = time.monotonic() - began
outcome["peak_rss"] = peak()
outcome["growth"] = peak() - baseline
print(json.dumps(outcome))
"""


def child(
    path: Path, format: str, action: str, warm_up: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(path), format, action]
        + ([str(warm_up)] if warm_up else []),
        env={"MALLOC_MMAP_THRESHOLD_": "65536", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        cwd=Path(__file__).resolve().parents[3],
        capture_output=True,
        text=True,
        timeout=300,
    )


def measured(
    path: Path, format: str, action: str = "validate", warm_up: Path | None = None
) -> dict[str, Any]:
    """What the child process found, its seconds and its peak resident set in bytes."""
    result = child(path, format, action, warm_up)
    assert result.returncode == 0, result.stderr
    outcome: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    return outcome


def write_npy_member(archive: zipfile.ZipFile, name: str, shape: tuple[int, ...]) -> None:
    """An int8 array of zeros, streamed into the archive a few MiB at a time."""
    with archive.open(f"{name}.npy", "w", force_zip64=True) as stream:
        np.lib.format.write_array_header_1_0(
            stream, {"descr": "|i1", "fortran_order": False, "shape": shape}
        )
        zeros = bytes(4 * MIB)
        left = int(np.prod(shape))
        while left:
            stream.write(zeros[: min(left, len(zeros))])
            left -= min(left, len(zeros))


@pytest.fixture(scope="module")
def zip_bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 2 MB on disk, 2 GiB unpacked: x of 1 GiB rows × 1 and y of 1 GiB, zeros."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        write_npy_member(archive, "x", (BOMB_ROWS, 1))
        write_npy_member(archive, "y", (BOMB_ROWS,))
    return path


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc and relies on glibc's malloc")
def test_an_npz_zip_bomb_is_invalid_quickly_with_bounded_memory(zip_bomb: Path) -> None:
    size = zip_bomb.stat().st_size
    assert size < 4 * MIB and 2 * MAX_NPZ_EXPANSION * size < BOMB_ROWS  # a bomb indeed

    outcome = measured(zip_bomb, "npz")

    figures = (
        f"peak RSS {outcome['peak_rss'] / MIB:.0f} MiB (grew {outcome['growth'] / MIB:.0f} MiB) "
        f"in {outcome['seconds']:.1f} s"
    )
    print(f"zip bomb of {size:,} bytes declaring {2 * BOMB_ROWS:,}: {figures}")
    assert outcome["status"] == "invalid", outcome
    assert outcome["errors"][0].startswith(
        f"array 'x' declares {BOMB_ROWS:,} bytes (shape ({BOMB_ROWS}, 1), int8) in "
    ), outcome["errors"]
    assert f"more than {MAX_NPZ_EXPANSION}× its size" in outcome["errors"][0]
    assert outcome["peak_rss"] < MAX_PEAK_BYTES, figures
    assert outcome["seconds"] < MAX_SECONDS, figures


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc and relies on glibc's malloc")
def test_loading_a_zip_bomb_refuses_it_from_its_header(zip_bomb: Path) -> None:
    # A file validated before this limit existed, or a bug in validation: the loader
    # reads the same headers and refuses too, before it allocates the arrays.
    result = child(zip_bomb, "npz", "load")
    assert result.returncode != 0
    assert "file file_000000000000000000000001: array 'x' declares" in result.stderr, result.stderr[
        -2000:
    ]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc and relies on glibc's malloc")
def test_a_large_csv_loads_into_arrays_of_its_own_size(tmp_path: Path) -> None:
    """Rows stream into arrays allocated once: the peak beyond the process's baseline is
    about the features' own bytes, not several copies of them."""
    columns, rows = 20, 200_000
    features_bytes = columns * rows * 4  # 16 MB of float32
    path, warm_up = tmp_path / "wide.csv", tmp_path / "small.csv"
    row = ",".join(["0.5"] * columns)
    for file, count in ((path, rows), (warm_up, 100)):
        with file.open("w") as handle:
            handle.write(",".join(f"f{index}" for index in range(columns)) + ",label\n")
            for index in range(count):
                handle.write(f"{row},c{index % 3}\n")

    outcome = measured(path, "csv", "load", warm_up)

    figures = (
        f"peak grew {outcome['growth'] / MIB:.1f} MiB loading {features_bytes / MIB:.1f} MiB "
        f"of features in {outcome['seconds']:.1f} s"
    )
    print(figures)
    assert outcome["rows"] == rows, outcome
    assert outcome["growth"] < 1.5 * features_bytes, figures
