"""generations.deleted_at: the result was taken down with 🗑 while an open case still needed its rows; the case
stays open for the moderators (a deleted public message no longer closes it) and the rows go once it is decided

Revision ID: d6a2f8c4e0b5
Revises: b9e3c5a7d1f4
Create Date: 2026-12-07 10:00:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "d6a2f8c4e0b5"
down_revision: str | Sequence[str] | None = "b9e3c5a7d1f4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("generations", sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("generations") as batch:
        batch.drop_column("deleted_at")
