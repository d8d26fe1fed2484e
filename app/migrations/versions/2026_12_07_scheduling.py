"""Scheduling: job priority, preemption, pause, queue age; tenants with shares and quotas

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 18:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("priority", sa.Integer(), nullable=False, server_default="500")
        )
        batch_op.add_column(
            sa.Column("preemptible", sa.Boolean(), nullable=False, server_default="true")
        )
        batch_op.add_column(sa.Column("queued_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("last_started_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("release_reason", sa.String(16), nullable=True))
        batch_op.add_column(sa.Column("held_by", sa.String(32), nullable=True))
    # A job queued before this migration ages from its submit.
    op.execute("UPDATE jobs SET queued_at = created_at WHERE status = 'queued'")
    with op.batch_alter_table("job_attempts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("waited_seconds", sa.Float(), nullable=True))
        batch_op.create_index("ix_job_attempts_ended_at", ["ended_at"], unique=False)
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_priority", sa.Integer(), nullable=True))
    op.create_table(
        "tenants",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("share", sa.Float(), nullable=False, server_default="1"),
        sa.Column("max_priority", sa.Integer(), nullable=True),
        sa.Column("max_running_devices", sa.Integer(), nullable=True),
        sa.Column("max_queued_jobs", sa.Integer(), nullable=True),
        sa.Column("max_device_hours", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_tenants")),
    )


def downgrade() -> None:
    op.drop_table("tenants")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("max_priority")
    with op.batch_alter_table("job_attempts", schema=None) as batch_op:
        batch_op.drop_index("ix_job_attempts_ended_at")
        batch_op.drop_column("waited_seconds")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        for column in (
            "held_by",
            "release_reason",
            "last_started_at",
            "queued_at",
            "preemptible",
            "priority",
        ):
            batch_op.drop_column(column)
