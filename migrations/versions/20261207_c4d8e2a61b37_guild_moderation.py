"""guild moderation: cases and actions know their guild, a case can be dismissed, guilds name a moderator role
and ban users for a while (guild_bans)

- ``moderation_cases.guild_id`` and ``moderation_actions.guild_id``: the review channel and the audit trail
  are per guild; old rows keep NULL (the guild was not recorded).
- case status ``dismissed`` and action ``dismiss``: a moderator closes a case without changing the image;
  action ``settings``: a guild setting changed (the named CHECK constraints are rebuilt with the new values;
  SQLite copies the table in batch mode).
- ``guild_settings.moderator_role_id``: holders of this role moderate the guild besides Manage Messages.
- ``guild_bans``: a guild's own ban of a user, with its reason, moderator, expiry (NULL: permanent) and when it
  was lifted; ``user_state.banned`` stays the operator's global ban.

Revision ID: c4d8e2a61b37
Revises: a7c31e5d9f02
Create Date: 2026-12-07 07:10:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c4d8e2a61b37"
down_revision: str | Sequence[str] | None = "a7c31e5d9f02"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CASE_STATUS_OLD = "status IN ('open', 'approved', 'removed')"
CASE_STATUS_NEW = "status IN ('open', 'approved', 'removed', 'dismissed')"
ACTION_OLD = "action IN ('approve', 'remove', 'ban', 'unban')"
ACTION_NEW = "action IN ('approve', 'remove', 'ban', 'unban', 'dismiss', 'settings')"


def _rebuild_check(table: str, name: str, sql: str) -> None:
    with op.batch_alter_table(table) as batch:  # SQLite: a copy of the table with the new constraint
        batch.drop_constraint(op.f(f"ck_{table}_{name}"), type_="check")
        batch.create_check_constraint(op.f(f"ck_{table}_{name}"), sa.text(sql))


def upgrade() -> None:
    op.add_column("moderation_cases", sa.Column("guild_id", sa.BigInteger(), nullable=True))
    op.create_index("ix_moderation_cases_guild_id_status", "moderation_cases", ["guild_id", "status"], unique=False)
    op.add_column("moderation_actions", sa.Column("guild_id", sa.BigInteger(), nullable=True))
    op.add_column("guild_settings", sa.Column("moderator_role_id", sa.BigInteger(), nullable=True))
    _rebuild_check("moderation_cases", "status", CASE_STATUS_NEW)
    _rebuild_check("moderation_actions", "action", ACTION_NEW)
    op.create_table(
        "guild_bans",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("guild_id", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("moderator_id", sa.BigInteger(), nullable=False),
        sa.Column("case_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lifted_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["case_id"], ["moderation_cases.id"],
                                name=op.f("fk_guild_bans_case_id_moderation_cases"), ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_guild_bans")),
    )
    op.create_index("ix_guild_bans_guild_id_user_id", "guild_bans", ["guild_id", "user_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_guild_bans_guild_id_user_id", table_name="guild_bans")
    op.drop_table("guild_bans")
    # rows with the new values cannot satisfy the old constraints: a dismissed case was closed unchanged
    op.execute("DELETE FROM moderation_actions WHERE action IN ('dismiss', 'settings')")
    op.execute("UPDATE moderation_cases SET status = 'approved' WHERE status = 'dismissed'")
    _rebuild_check("moderation_actions", "action", ACTION_OLD)
    _rebuild_check("moderation_cases", "status", CASE_STATUS_OLD)
    with op.batch_alter_table("guild_settings") as batch:
        batch.drop_column("moderator_role_id")
    with op.batch_alter_table("moderation_actions") as batch:
        batch.drop_column("guild_id")
    op.drop_index("ix_moderation_cases_guild_id_status", table_name="moderation_cases")
    with op.batch_alter_table("moderation_cases") as batch:
        batch.drop_column("guild_id")
