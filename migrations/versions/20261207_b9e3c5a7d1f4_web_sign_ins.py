"""web_sign_ins: one-time sign-in links to the moderators' web page

A link printed by ``python -m bot web link`` or given by ``/dalle-mod web`` must be redeemable once, within 10
minutes, by whichever web process serves it: the hash of its secret, the rights it carries and its use live here.

Revision ID: b9e3c5a7d1f4
Revises: f2b8d4e6a1c3
Create Date: 2026-12-07 09:40:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b9e3c5a7d1f4"
down_revision: str | Sequence[str] | None = "f2b8d4e6a1c3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "web_sign_ins",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("operator", sa.Boolean(), nullable=False),
        sa.Column("grants", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_web_sign_ins")),
    )
    op.create_index("ix_web_sign_ins_expires_at", "web_sign_ins", ["expires_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_web_sign_ins_expires_at", table_name="web_sign_ins")
    op.drop_table("web_sign_ins")
