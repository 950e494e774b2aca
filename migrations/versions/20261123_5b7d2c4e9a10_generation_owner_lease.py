"""generations.owner and generations.lease_until: which bot process runs a job, and until when it vouches for it

Several bot processes may share one PostgreSQL database. A process that starts must put back in the queue the
jobs a dead process left running, but not the jobs a live one is running: the owner renews its jobs' lease
while it works on them, and only jobs whose lease ran out (or that carry none) count as interrupted.

Revision ID: 5b7d2c4e9a10
Revises: 3f1c9a7e2b40
Create Date: 2026-11-23 18:50:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5b7d2c4e9a10"
down_revision: str | Sequence[str] | None = "3f1c9a7e2b40"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("generations", sa.Column("owner", sa.String(length=96), nullable=True))
    op.add_column("generations", sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("generations") as batch:  # SQLite drops columns by copying the table
        batch.drop_column("lease_until")
        batch.drop_column("owner")
