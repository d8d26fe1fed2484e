"""One rank of a job on several devices, as torch.distributed.run starts it
(worker/group.py): `python -m worker.rank JOB_ID CLAIM_JSON OUTCOME_PATH`.

Rank 0 runs the job as the pool child runs a one-device job (lease, progress, events,
checkpoints, stop requests) and writes the outcome to OUTCOME_PATH; the others train
their share of each window and report nothing.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from app.db import Database
from app.jobs.models import Job
from app.jobs.runs import Claim
from app.jobs.spec import JobSpec
from app.observability.logs import configure_logging, job_context
from app.settings import Settings, get_settings
from worker.engine.distributed import GroupBroken, RankGroup, join_group
from worker.engine.errors import TrainingError
from worker.engine.hf import HfLimits
from worker.engine.trainer import Callbacks, train
from worker.faults import fault_hooks
from worker.group import write_outcome
from worker.job_runner import (
    RANK_FAILED,
    latest_checkpoint,
    outcome_to_json,
    run_files,
    train_claimed,
)
from worker.live import LivePublisher
from worker.parent_death import dies_with

logger = logging.getLogger(__name__)


def collective_timeout(settings: Settings) -> timedelta:
    """Well under the lease: a window whose peer hangs ends the group, and the job is
    retried, within the time the reaper would give a lost worker."""
    return timedelta(seconds=max(10.0, settings.lease_timeout_seconds / 2))


# Between windows the others wait while rank 0 saves a checkpoint (GiBs into the
# database) or retries its progress writes through a database blip.
BETWEEN_WINDOWS = timedelta(hours=1)


def follow(database: Database, settings: Settings, job_id: str, group: RankGroup) -> int:
    """A rank other than 0: its share of every window, nothing reported."""
    with database.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        spec = JobSpec.model_validate(job.spec)
    try:
        with run_files(database, settings, spec) as files:
            train(
                spec,
                Callbacks(),
                resume=latest_checkpoint(database, settings, job_id),
                hooks=fault_hooks(settings.test_faults),
                files=files,
                hf_limits=HfLimits(settings.hf_model_dirs, settings.hf_max_parameters),
                group=group,
                deterministic=settings.deterministic,
            )
    except TrainingError:
        return 0  # every rank meets it at the same point: rank 0 reports it
    except GroupBroken:
        logger.warning("job %s: rank %d lost its group", job_id, group.rank)
        return 1
    return 0


def main(argv: list[str]) -> int:
    job_id, claim_json, outcome_path = argv
    dies_with(os.getppid(), signal.SIGKILL)()  # never outlive the launcher
    settings = get_settings()
    configure_logging(settings)
    group = join_group(collective_timeout(settings), BETWEEN_WINDOWS)
    database = Database(settings.effective_database_url)
    broken = False
    try:
        if group.rank != 0:
            exit_code = follow(database, settings, job_id, group)
            broken = exit_code != 0
            return exit_code
        claim = Claim(**json.loads(claim_json))
        publisher = LivePublisher(settings.redis_url)
        try:
            with database.session() as session:
                job = session.get(Job, job_id)
                assert job is not None
                spec = JobSpec.model_validate(job.spec)
            with job_context(job_id, claim.attempt):  # on every log line of the run
                outcome = train_claimed(database, settings, publisher, claim, spec, group)
        finally:
            publisher.close()
        write_outcome(Path(outcome_path), outcome_to_json(outcome))
        # A broken group is a failed one for the launcher too: it then stops at once,
        # where a rank that succeeded would wait at its exit barrier for the lost node.
        broken = outcome is not None and outcome.hand_back == RANK_FAILED
        return 1 if broken else 0
    finally:
        database.dispose()
        if not broken:  # its peers are gone: tearing the group down would wait for them
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
