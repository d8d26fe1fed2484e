"""The ceiling for bench/api.py: a bare FastAPI endpoint on the API's server settings.

One route, `GET /bare`, answers a small JSON object with no middleware, no database and
no dependencies. It is served the way `trainjob serve` serves the API
(`cli/serve.py`, `_run_api`): one uvicorn process, the same `uvicorn.Config`
arguments (host, port, log level and logging config from the same TRAINJOB_* settings,
so the access log is on as it is for the API). Whatever the API answers slower than
this is the cost of the service itself.

With `--layers` it serves the real app (`app.main.create_app`, the TRAINJOB_* settings
of the environment) plus probe routes that each stop one layer short of the job GET
(an `async def` route that reads the job's row with the coalesced async lookup of
app/reads.py), so that bench/api.py can say where the job GET's time goes:

    /bench/async             an `async def` route: the app's middleware and FastAPI
    /bench/deps              + the job GET's dependencies (reads, principal)
    /bench/query/{job_id}    + the job's row (`jobs_service.read_job`): the job GET
                             without its response model
    /bench/old/{job_id}      for comparison, the read the job GET made before issue 13:
                             `session.get(Job, id)` in one hop to the thread pool

    .venv/bin/python bench/bare_app.py --port 8001
    .venv/bin/python bench/bare_app.py --port 8002 --layers
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import uvicorn
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from uvicorn.config import LOGGING_CONFIG

# At module level: FastAPI reads the probe routes' annotations from these globals.
from app.auth.deps import PrincipalDep
from app.db import Database
from app.deps import DatabaseDep, ReadsDep
from app.jobs import service as jobs_service
from app.jobs.models import Job
from app.main import create_app
from app.settings import get_settings


def create_bare_app() -> FastAPI:
    app = FastAPI(title="bare")

    @app.get("/bare")
    async def bare() -> dict[str, object]:
        return {"ok": True, "service": "bare"}

    return app


def _job_exists(database: Database, job_id: str) -> dict[str, object]:
    with database.session() as session:
        return {"ok": session.get(Job, job_id) is not None}


def create_layered_app() -> FastAPI:
    app = create_app()

    @app.get("/bench/async")
    async def layer_async() -> dict[str, object]:
        return {"ok": True}

    @app.get("/bench/deps")
    async def layer_deps(reads: ReadsDep, principal: PrincipalDep) -> dict[str, object]:
        return {"ok": True, "tenant": principal.tenant}

    @app.get("/bench/query/{job_id}")
    async def layer_query(
        job_id: str, reads: ReadsDep, principal: PrincipalDep
    ) -> dict[str, object]:
        await jobs_service.read_job(reads, job_id=job_id, tenant=principal.scope)
        return {"ok": True}

    @app.get("/bench/old/{job_id}")
    async def old_read(
        job_id: str, database: DatabaseDep, principal: PrincipalDep
    ) -> dict[str, object]:
        return await run_in_threadpool(_job_exists, database, job_id)

    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A bare FastAPI endpoint, GET /bare.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--layers", action="store_true", help="the real app plus probe routes, one layer each"
    )
    args = parser.parse_args(argv)
    settings = get_settings()
    config = uvicorn.Config(
        create_layered_app() if args.layers else create_bare_app(),
        host=args.host,
        port=args.port,
        log_level=settings.log_level.lower(),
        log_config=None if settings.log_format == "json" else LOGGING_CONFIG,
    )
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
