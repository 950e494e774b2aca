"""images.critical: the safety check flagged the image for a critical concept, so it is withheld whatever the
guild's flagged mode (a mild flag follows the guild: spoiler or withhold)

Revision ID: f2b8d4e6a1c3
Revises: e5f1a9c3d7b2
Create Date: 2026-12-07 09:40:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "f2b8d4e6a1c3"
down_revision: str | Sequence[str] | None = "e5f1a9c3d7b2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("images", sa.Column("critical", sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_column("critical")
