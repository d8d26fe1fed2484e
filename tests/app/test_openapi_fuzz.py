"""Property-based run of schemathesis against the app's own OpenAPI schema.

Every operation gets a bounded, derandomized set of generated requests (valid and
invalid), sent in-process to the ASGI app on real migrated databases (a SQLite file and a
Postgres database of its own) and Redis. A response fails the test when it is a 5xx,
breaks the declared schema (status code, content type, body, each event of a stream), or
is a 4xx/5xx without the error envelope.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import redis
import schemathesis
from hypothesis import strategies as st
from schemathesis import GenerationMode, checks
from schemathesis.python import asgi

from app.blobs import DatabaseStore
from app.checkpoints import service as checkpoints_service
from app.db import Database, upgrade
from app.files import service as files_service
from app.files.models import JobFile
from app.jobs import runs
from app.jobs import service as jobs_service
from app.jobs.spec import JobSpec
from app.main import create_app
from app.settings import Settings
from tests.conftest import REDIS_URL

SPEC = {
    "model": {"type": "mlp", "hidden_sizes": [8]},
    "dataset": {"type": "digits"},
    "micro_batch_size": 4,
    "accumulation_steps": 2,
    "max_steps": 3,
}


def _seed(database: Database) -> list[str]:
    """A succeeded job with metrics, events, an attempt and a checkpoint, and a cancelled
    one: real ids for the fuzzer to hit, and streams that end (both are terminal)."""
    with database.session() as session:
        done = jobs_service.create_job(session, spec=JobSpec.model_validate(SPEC))
        cancelled = jobs_service.create_job(session, spec=JobSpec.model_validate(SPEC))
        session.flush()
        claim = runs.claim_job(session, job_id=done.id, worker="fuzz", lease_timeout=60)
        assert claim is not None
        metric = {"step": 1, "loss": 1.0, "lr": 0.1, "grad_norm": 0.2, "samples_per_sec": 50.0,
                  "micro_batch_size": 4, "time": time.time(), "eval_loss": 0.9}  # fmt: skip
        runs.record_progress(
            session, claim=claim, job_values={"step": 1}, metrics=[metric], events=[]
        )
        checkpoints_service.save_checkpoint(
            session, claim=claim, store=DatabaseStore(), step=1, weights=b"w", state=b"s",
            loss=1.0,
        )  # fmt: skip
        runs.finish_job(session, claim=claim, status="succeeded")
        jobs_service.request_cancel(session, job_id=cancelled.id)
        # An uploaded file a queued job uses: it can be read, and its DELETE is a 409.
        upload = files_service.Upload(
            store=DatabaseStore(), tenant="default", filename="seed.jsonl"
        )
        upload.write(b'{"text": "seed"}\n')
        data_file = upload.finish(session, format="jsonl")
        waiting = jobs_service.create_job(session, spec=JobSpec.model_validate(SPEC))
        session.add(JobFile(job_id=waiting.id, file_id=data_file.id, role="train"))
        session.commit()
        return [done.id, cancelled.id, data_file.id]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def api_schema(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    # Postgres too: it refuses what SQLite stores (a NUL in text, a number past 64 bits).
    home = tmp_path_factory.mktemp("fuzz")
    if request.param == "postgres":  # a database of its own: the fuzzer writes jobs
        url = request.getfixturevalue("make_postgres_database")()
    else:
        url = f"sqlite:///{home / 'trainjob.db'}"
    upgrade(url)
    database = Database(url)
    job_ids = _seed(database)
    database.dispose()
    queue = f"test-fuzz-{home.name}"
    settings = Settings(
        home=Path(home) / "home",
        database_url=url,
        redis_url=REDIS_URL,
        queue=queue,
        reaper_interval_seconds=0,  # no background writes while the fuzzer reads
        max_active_jobs_per_tenant=1_000_000,  # the fuzzer submits many valid specs
    )
    yield schemathesis.openapi.from_asgi("/openapi.json", create_app(settings)), job_ids
    asgi.shutdown_lifespans()  # the app's lifespan: stop its hub, close Redis and the DB
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(queue)
    client.close()


def error_envelope(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx and 5xx body is {"error": {"type": str, "message": str, ...}}."""
    if response.status_code < 400:
        return None
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error.get("type"), str) and isinstance(error.get("message"), str), body
    if response.status_code == 422 and error["type"] == "validation_error":
        assert all(isinstance(field.get("path"), str) for field in error["fields"]), body
    return True


# Not positive_data_acceptance: a spec's cross-field rules (two of the three batch fields,
# a model that fits its data) are beyond JSON Schema, so schema-valid bodies such as
# {"model": {}, "dataset": {}} are rightly 422.
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]


def _operations() -> list[tuple[str, GenerationMode]]:
    """Each operation with valid inputs, and with invalid ones where it has inputs that can
    be invalid (a query, a header or a body: a path id is any string, so never invalid)."""
    # Building the schema needs no database: the app's lifespan does not run here.
    paths = create_app(Settings(database_url="sqlite://", redis_url=REDIS_URL)).openapi()["paths"]
    cases = []
    for path, item in paths.items():
        for method, operation in item.items():
            label = f"{method.upper()} {path}"
            cases.append((label, GenerationMode.POSITIVE))
            parameters = operation.get("parameters", [])
            if "requestBody" in operation or any(p["in"] != "path" for p in parameters):
                cases.append((label, GenerationMode.NEGATIVE))
    return cases


@pytest.mark.parametrize(("label", "mode"), _operations())
def test_no_server_error_schema_violation_or_bare_error(
    api_schema: Any, label: str, mode: GenerationMode
) -> None:
    schema, job_ids = api_schema
    operation = schema.find_operation_by_label(label)
    assert operation is not None

    @hypothesis.given(case=operation.as_strategy(mode), job_id=st.sampled_from([None, *job_ids]))
    @hypothesis.settings(
        max_examples=25,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    def run(case: Any, job_id: str | None) -> None:
        # Random ids are all 404s: mix in the real ones so the route past the lookup runs.
        name = "file_id" if job_id is not None and job_id.startswith("file_") else "job_id"
        if job_id is not None and name in (case.path_parameters or {}):
            case.path_parameters[name] = job_id
        case.call_and_validate(checks=CHECKS, additional_checks=[error_envelope])

    run()


def storable(text: str | None, limit: int) -> bool:
    return text is None or ("\x00" not in text and len(text) <= limit)


def test_valid_specs_with_any_name_and_metadata_round_trip_or_are_refused(api_schema: Any) -> None:
    # The cross-field rules of a spec (two of three batch fields, a model that fits its
    # data) are beyond JSON Schema, so generated bodies are nearly all 422: here a valid
    # spec carries arbitrary text where user text is stored.
    schema, _ = api_schema
    submit = schema.find_operation_by_label("POST /v1/jobs")
    read = schema.find_operation_by_label("GET /v1/jobs/{job_id}")
    # Any character, with those that break things (NUL, quotes, bidi, BOM) more often.
    characters = st.characters() | st.sampled_from("\x00'\";-%_\\/\u202e\ufeff\U0001f680")
    texts = st.text(characters, max_size=130)  # past the 128-character bound for name

    @hypothesis.given(
        name=st.none() | texts,
        metadata=st.none() | st.dictionaries(st.text(max_size=70), texts, max_size=17),
    )
    @hypothesis.settings(
        max_examples=50,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    def run(name: str | None, metadata: dict[str, str] | None) -> None:
        body = {**SPEC, "name": name, "metadata": metadata}
        case = submit.Case(body=body, media_type="application/json")
        response = case.call_and_validate(checks=CHECKS, additional_checks=[error_envelope])
        items = (metadata or {}).items()
        valid = storable(name, 128) and len(items) <= 16
        if not (valid and all(storable(key, 64) and storable(value, 512) for key, value in items)):
            assert response.status_code == 422, response.text
            return
        assert response.status_code == 201, response.text
        job = read.Case(path_parameters={"job_id": response.json()["id"]})
        stored = job.call_and_validate(checks=CHECKS, additional_checks=[error_envelope]).json()
        assert stored["name"] == name
        assert stored["spec"]["metadata"] == metadata

    run()
