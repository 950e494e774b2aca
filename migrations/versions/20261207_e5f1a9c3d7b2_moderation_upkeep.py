"""moderation upkeep: expiring strikes, cooldowns as guild bans, an image-hash blocklist, appeals and bot-closed
cases, and the guild settings the admin commands change

- ``strikes``: one row per offence (refusal, removal, by hand) with its expiry and when a moderator reset it.
- ``guild_bans.kind``: ``ban`` or ``cooldown`` (existing rows are bans), so cooldowns survive a restart.
- ``image_blocks`` and ``images.phash``: blocked perceptual hashes (per guild, or all guilds when NULL).
- ``moderation_cases``: sources ``blocklist``, ``refusals``, ``appeal``; statuses ``accepted``, ``rejected``,
  ``closed``; ``user_id`` (whom the case is about), ``note`` (closing note), ``repinged_at``.
- ``moderation_actions.action``: filter, strike, strikes_reset, cooldown, purge, block, unblock, accept, reject,
  close, delete.
- ``guild_settings``: max_images, notify_mode, channel_ids, private_results, automod, strike_days,
  strikes_to_cooldown, cooldown_minutes, strikes_to_ban, ban_days, reping_hours, appeal_days.

Revision ID: e5f1a9c3d7b2
Revises: c4d8e2a61b37
Create Date: 2026-12-07 09:10:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e5f1a9c3d7b2"
down_revision: str | Sequence[str] | None = "c4d8e2a61b37"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SOURCE_OLD = "source IN ('auto', 'report')"
SOURCE_NEW = "source IN ('auto', 'report', 'blocklist', 'refusals', 'appeal')"
STATUS_OLD = "status IN ('open', 'approved', 'removed', 'dismissed')"
STATUS_NEW = "status IN ('open', 'approved', 'removed', 'dismissed', 'accepted', 'rejected', 'closed')"
ACTION_OLD = "action IN ('approve', 'remove', 'ban', 'unban', 'dismiss', 'settings')"
ACTION_NEW = (
    "action IN ('approve', 'remove', 'ban', 'unban', 'dismiss', 'settings', 'filter', 'strike', 'strikes_reset', "
    "'cooldown', 'purge', 'block', 'unblock', 'accept', 'reject', 'close', 'delete')"
)
GUILD_INTS = (
    "max_images", "strike_days", "strikes_to_cooldown", "cooldown_minutes", "strikes_to_ban", "ban_days",
    "reping_hours", "appeal_days",
)


def _rebuild_check(table: str, name: str, sql: str) -> None:
    with op.batch_alter_table(table) as batch:  # SQLite: a copy of the table with the new constraint
        batch.drop_constraint(op.f(f"ck_{table}_{name}"), type_="check")
        batch.create_check_constraint(op.f(f"ck_{table}_{name}"), sa.text(sql))


def upgrade() -> None:
    op.create_table(
        "strikes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("guild_id", sa.BigInteger(), nullable=True),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("case_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cleared_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("source IN ('refusal', 'removal', 'manual')", name=op.f("ck_strikes_source")),
        sa.ForeignKeyConstraint(["case_id"], ["moderation_cases.id"],
                                name=op.f("fk_strikes_case_id_moderation_cases"), ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_strikes")),
    )
    op.create_index("ix_strikes_user_id_guild_id_expires_at", "strikes", ["user_id", "guild_id", "expires_at"])
    op.create_table(
        "image_blocks",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("guild_id", sa.BigInteger(), nullable=True),
        sa.Column("phash", sa.String(length=16), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=True),
        sa.Column("case_id", sa.Integer(), nullable=True),
        sa.Column("moderator_id", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lifted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lifted_by", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"],
                                name=op.f("fk_image_blocks_image_id_images"), ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["case_id"], ["moderation_cases.id"],
                                name=op.f("fk_image_blocks_case_id_moderation_cases"), ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_image_blocks")),
    )
    op.create_index("ix_image_blocks_guild_id_lifted_at", "image_blocks", ["guild_id", "lifted_at"])
    op.add_column("images", sa.Column("phash", sa.String(length=16), nullable=True))
    with op.batch_alter_table("guild_bans") as batch:
        batch.add_column(sa.Column("kind", sa.String(length=16), server_default="ban", nullable=False))
        batch.create_check_constraint(op.f("ck_guild_bans_kind"), sa.text("kind IN ('ban', 'cooldown')"))
    op.add_column("moderation_cases", sa.Column("user_id", sa.BigInteger(), nullable=True))
    op.add_column("moderation_cases", sa.Column("note", sa.Text(), nullable=True))
    op.add_column("moderation_cases", sa.Column("repinged_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_moderation_cases_user_id_source", "moderation_cases", ["user_id", "source"])
    _rebuild_check("moderation_cases", "source", SOURCE_NEW)
    _rebuild_check("moderation_cases", "status", STATUS_NEW)
    _rebuild_check("moderation_actions", "action", ACTION_NEW)
    for name in GUILD_INTS:
        op.add_column("guild_settings", sa.Column(name, sa.Integer(), nullable=True))
    op.add_column("guild_settings", sa.Column("notify_mode", sa.String(length=16), nullable=True))
    op.add_column("guild_settings", sa.Column("channel_ids", sa.JSON(), nullable=True))
    op.add_column("guild_settings", sa.Column("private_results", sa.Boolean(), nullable=True))
    op.add_column("guild_settings", sa.Column("automod", sa.Boolean(), nullable=True))
    op.execute("UPDATE guild_settings SET channel_ids = '[]'")
    with op.batch_alter_table("guild_settings") as batch:
        batch.alter_column("channel_ids", existing_type=sa.JSON(), nullable=False)
        batch.create_check_constraint(
            op.f("ck_guild_settings_notify_mode"), sa.text("notify_mode IS NULL OR notify_mode IN ('ephemeral', 'dm')")
        )


def downgrade() -> None:
    with op.batch_alter_table("guild_settings") as batch:
        batch.drop_constraint(op.f("ck_guild_settings_notify_mode"), type_="check")
        for name in (*GUILD_INTS, "notify_mode", "channel_ids", "private_results", "automod"):
            batch.drop_column(name)
    # rows with the new values cannot satisfy the old constraints
    op.execute(
        "DELETE FROM moderation_actions WHERE action IN ('filter', 'strike', 'strikes_reset', 'cooldown', 'purge', "
        "'block', 'unblock', 'accept', 'reject', 'close', 'delete')"
    )
    op.execute("DELETE FROM moderation_cases WHERE source IN ('blocklist', 'refusals', 'appeal')")
    op.execute("UPDATE moderation_cases SET status = 'dismissed' WHERE status IN ('accepted', 'rejected', 'closed')")
    _rebuild_check("moderation_actions", "action", ACTION_OLD)
    _rebuild_check("moderation_cases", "status", STATUS_OLD)
    _rebuild_check("moderation_cases", "source", SOURCE_OLD)
    op.drop_index("ix_moderation_cases_user_id_source", table_name="moderation_cases")
    with op.batch_alter_table("moderation_cases") as batch:
        batch.drop_column("repinged_at")
        batch.drop_column("note")
        batch.drop_column("user_id")
    op.execute("DELETE FROM guild_bans WHERE kind = 'cooldown'")
    with op.batch_alter_table("guild_bans") as batch:
        batch.drop_constraint(op.f("ck_guild_bans_kind"), type_="check")
        batch.drop_column("kind")
    with op.batch_alter_table("images") as batch:
        batch.drop_column("phash")
    op.drop_index("ix_image_blocks_guild_id_lifted_at", table_name="image_blocks")
    op.drop_table("image_blocks")
    op.drop_index("ix_strikes_user_id_guild_id_expires_at", table_name="strikes")
    op.drop_table("strikes")
