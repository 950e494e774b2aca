"""generations.upload_limit: the interaction's attachment size limit, kept for delivery after a restart

Discord sends ``attachment_size_limit`` with every interaction (it depends on the guild's boost tier and on the
context); the result message is sized to it. Nullable: older rows and the terminal front end have none.

Revision ID: 3f1c9a7e2b40
Revises: 8e57b1dc57da
Create Date: 2026-11-23 15:10:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "3f1c9a7e2b40"
down_revision: str | Sequence[str] | None = "8e57b1dc57da"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("generations", sa.Column("upload_limit", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("generations") as batch:  # SQLite drops columns by copying the table
        batch.drop_column("upload_limit")
