"""The launcher command of a group (worker/group.py): one machine's standalone rendezvous,
or one node of a multi-node job's c10d rendezvous at its leader."""

from __future__ import annotations

import sys
from dataclasses import replace

from worker.group import Rendezvous, launcher_command


def test_a_one_machine_group_meets_on_a_standalone_rendezvous() -> None:
    command = launcher_command(2, "worker.rank", ["JOB", "{}", "/tmp/o"])
    assert command[:4] == [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    assert command[-5:] == ["-m", "worker.rank", "JOB", "{}", "/tmp/o"]
    assert "--nproc-per-node=2" in command and "--max-restarts=0" in command


def test_a_node_of_a_gang_meets_the_others_at_its_leader_s_c10d_rendezvous() -> None:
    rendezvous = Rendezvous(
        nodes=3,
        address="10.0.0.1",
        port=29411,
        run_id="job_x-4",
        is_host=False,
        local_address="10.0.0.2",
        join_timeout_seconds=60,
    )
    command = launcher_command(1, "worker.rank", ["JOB"], rendezvous)
    assert "--standalone" not in command
    assert command[3:9] == [
        "--nnodes=3",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=10.0.0.1:29411",
        "--rdzv-id=job_x-4",
        "--rdzv-conf=is_host=false,join_timeout=60,read_timeout=90",
        "--local-addr=10.0.0.2",
    ]
    assert "--nproc-per-node=1" in command and "--max-restarts=0" in command
    leader = launcher_command(1, "worker.rank", ["JOB"], replace(rendezvous, is_host=True))
    assert "--rdzv-conf=is_host=true,join_timeout=60,read_timeout=90" in leader
