"""The worker's pool children load the engine before a job comes; its parent never does.

A real `trainjob worker` process: what is loaded is read from /proc (the shared libraries
each process has mapped), not from the code under test.
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import REDIS_URL
from tests.processes import running, service_env, wait_while_running


def children_of(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it exited meanwhile
            continue
        if int(fields[1]) == pid:  # the parent's pid, after the state
            children.append(int(stat.parent.name))
    return children


def has_torch_loaded(pid: int) -> bool:
    return "/torch/" in Path(f"/proc/{pid}/maps").read_text()


def test_a_pool_child_preloads_torch_while_idle_and_the_parent_never_imports_it(
    postgres_url: str, queue_name: str, tmp_path: Path
) -> None:
    env = service_env(
        database_url=postgres_url,
        redis_url=REDIS_URL,
        queue=f"{queue_name}-preload",
        home=str(tmp_path / "home"),
    )
    log = tmp_path / "worker.log"
    with running(["worker"], env, log) as worker:
        # No job was sent: the child loads the engine on its own, as it starts.
        wait_while_running(
            worker,
            log,
            lambda: "preloaded the engine in" in log.read_text(errors="replace"),
            120,
            "the pool child to preload the engine",
        )
        children = children_of(worker.pid)
        assert children, log.read_text()
        assert all(has_torch_loaded(child) for child in children)
        # Forking after torch (and CUDA) initialisation would break every later child.
        assert not has_torch_loaded(worker.pid)
