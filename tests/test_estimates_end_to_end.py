"""The estimated finish of a job of steady steps on a real worker, against its real finish.

The acceptance of issue 16: read `estimated_finish` at 20 % progress; it must be within
15 % of the job's run duration (`finished_at - started_at`: one run, from the claim to
the end) of the actual `finished_at`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from tests.conftest import StartService
from tests.processes import wait_for, wait_for_status

STEPS = 50
# One micro-batch a step, slowed to about 0.1 s: a steady pace of about 5 s in all.
SPEC: dict[str, Any] = {
    "model": {"type": "mlp", "hidden_sizes": [8]},
    "dataset": {"type": "digits"},
    "micro_batch_size": 8,
    "accumulation_steps": 1,
    "max_steps": STEPS,
    "checkpoint_every": 0,
    "device": "cpu",
}


def test_the_estimate_at_20_percent_is_within_15_percent_of_the_run_of_the_real_finish(
    start_service: StartService,
) -> None:
    with start_service(
        "eta", worker_env={"TRAINJOB_TEST_FAULTS": "slow=0.1"}, progress_flush_seconds="0.1"
    ) as client:
        job_id = client.post("/v1/jobs", json=SPEC).json()["id"]

        def estimate_at_a_fifth() -> dict[str, Any] | None:
            job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
            past_a_fifth = job["progress"]["step"] >= STEPS // 5
            return job if past_a_fifth and job["estimated_finish"] else None

        early = wait_for(estimate_at_a_fifth, 30, "the estimate at 20 % progress", interval=0.02)
        assert early["progress"]["step"] < STEPS // 2, "read too late to test an estimate"
        done = wait_for_status(client, job_id, {"succeeded", "failed", "cancelled"}, timeout=30)
        assert done["status"] == "succeeded", done["error"]
        assert (done["queue_position"], done["estimated_finish"]) == (None, None)

    estimated = datetime.fromisoformat(early["estimated_finish"])
    finished = datetime.fromisoformat(done["finished_at"])
    run_seconds = (finished - datetime.fromisoformat(done["started_at"])).total_seconds()
    error_seconds = abs((estimated - finished).total_seconds())
    assert error_seconds <= 0.15 * run_seconds, (early["progress"], estimated, finished)
