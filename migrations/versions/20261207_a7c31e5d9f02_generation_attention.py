"""generations.attention: the decode-attention backend that made the images ("xla" or "native")

A seed gives the same image only with the same checkpoint, attention backend and dtype, so each finished
generation records its backend beside its checkpoint id. Nullable: rows made before, and fake engines, have none.

Revision ID: a7c31e5d9f02
Revises: 5b7d2c4e9a10
Create Date: 2026-12-07 07:00:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a7c31e5d9f02"
down_revision: str | Sequence[str] | None = "5b7d2c4e9a10"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("generations", sa.Column("attention", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("generations") as batch:  # SQLite drops columns by copying the table
        batch.drop_column("attention")
