"""Checkpoint listing and weights download over HTTP."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.blobs import DatabaseStore
from app.checkpoints import service as checkpoints_service
from app.db import Database
from app.jobs import runs

SPEC = {"model": {"type": "mlp"}, "dataset": {"type": "digits"}, "batch_size": 8,
        "micro_batch_size": 8, "max_steps": 3}  # fmt: skip


def test_weights_are_404_until_a_checkpoint_exists_then_stream(
    client: TestClient, database: Database
) -> None:
    job = client.post("/v1/jobs", json=SPEC).json()
    missing = client.get(f"/v1/jobs/{job['id']}/weights")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "no_checkpoint"
    with database.session() as session:
        claim = runs.claim_job(session, job_id=job["id"], worker="w", lease_timeout=60)
        assert claim is not None
        for step in (1, 2):
            checkpoints_service.save_checkpoint(
                session, claim=claim, store=DatabaseStore(), step=step,
                weights=b"weights-%d" % step, state=b"state", loss=0.1 * step,
            )  # fmt: skip
        session.commit()
    listed = client.get(f"/v1/jobs/{job['id']}/checkpoints").json()
    assert [c["step"] for c in listed["data"]] == [1, 2]
    assert set(listed["data"][0]) >= {"step", "created_at", "size_bytes", "loss"}
    assert listed["data"][0]["size_bytes"] == len(b"weights-1") + len(b"state")
    latest = client.get(f"/v1/jobs/{job['id']}/weights")
    assert latest.status_code == 200 and latest.content == b"weights-2"
    assert latest.headers["content-type"] == "application/octet-stream"
    assert "step-2.safetensors" in latest.headers["content-disposition"]
    named = client.get(f"/v1/jobs/{job['id']}/weights", params={"step": 1})
    assert named.content == b"weights-1"
    assert client.get(f"/v1/jobs/{job['id']}/weights", params={"step": 7}).status_code == 404


def test_listed_checkpoints_carry_eval_loss_and_pruned_ones_are_gone(
    client: TestClient, database: Database
) -> None:
    spec = {**SPEC, "keep_checkpoints": {"last": 1, "best": 1}}
    job = client.post("/v1/jobs", json=spec).json()
    with database.session() as session:
        claim = runs.claim_job(session, job_id=job["id"], worker="w", lease_timeout=60)
        assert claim is not None
        for step, eval_loss in ((1, None), (2, 0.4), (3, 0.6), (4, 0.5)):
            checkpoints_service.save_checkpoint(
                session, claim=claim, store=DatabaseStore(), step=step, weights=b"w",
                state=b"s", loss=1.0, eval_loss=eval_loss,
            )  # fmt: skip
        session.commit()
    listed = client.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]
    assert [(c["step"], c["eval_loss"]) for c in listed] == [(2, 0.4), (4, 0.5)]
    assert client.get(f"/v1/jobs/{job['id']}/weights", params={"step": 3}).status_code == 404
    assert client.get(f"/v1/jobs/{job['id']}/weights").headers["x-checkpoint-step"] == "4"
