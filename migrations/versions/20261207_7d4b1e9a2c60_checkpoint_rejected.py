"""model registry: a ``rejected`` checkpoint status, and audited model actions

- ``checkpoints.status``: ``rejected`` (the promotion gate turned the candidate down). Until now such a candidate
  was stored as ``retired`` with ``metrics.rejected`` true; those rows become ``rejected`` (their metrics are kept).
- ``moderation_actions.action``: model_train, model_promote, model_rollback, model_reject (who started a fine-tune,
  promoted or rolled back the served checkpoint; the gate's rejections, by the bot itself).

Both columns are short strings with named CHECK constraints (not database enums), so the constraints are rebuilt
(SQLite: a copy of the table, ``batch_alter_table``), as e5f1a9c3d7b2 did. The downgrade turns ``rejected`` rows
back into ``retired`` with ``metrics.rejected`` true (what the older code reads) and deletes the model actions.

Revision ID: 7d4b1e9a2c60
Revises: a3c7e9f1b5d8
Create Date: 2026-12-07 11:20:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "7d4b1e9a2c60"
down_revision: str | Sequence[str] | None = "a3c7e9f1b5d8"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUS_OLD = "status IN ('candidate', 'active', 'retired')"
STATUS_NEW = "status IN ('candidate', 'active', 'rejected', 'retired')"
ACTIONS = (
    "'approve', 'remove', 'ban', 'unban', 'dismiss', 'settings', 'filter', 'strike', 'strikes_reset', 'cooldown', "
    "'purge', 'block', 'unblock', 'accept', 'reject', 'close', 'delete'"
)
MODEL_ACTIONS = "'model_train', 'model_promote', 'model_rollback', 'model_reject'"
ACTION_OLD = f"action IN ({ACTIONS})"
ACTION_NEW = f"action IN ({ACTIONS}, {MODEL_ACTIONS})"


def _rebuild_check(table: str, name: str, sql: str) -> None:
    with op.batch_alter_table(table) as batch:  # SQLite: a copy of the table with the new constraint
        batch.drop_constraint(op.f(f"ck_{table}_{name}"), type_="check")
        batch.create_check_constraint(op.f(f"ck_{table}_{name}"), sa.text(sql))


def _sqlite() -> bool:
    return op.get_bind().dialect.name == "sqlite"


def upgrade() -> None:
    _rebuild_check("checkpoints", "status", STATUS_NEW)
    _rebuild_check("moderation_actions", "action", ACTION_NEW)
    # metrics is JSON text on SQLite and ``json`` on PostgreSQL (not jsonb): one reading of ``rejected`` for each
    flagged = ("json_extract(metrics, '$.rejected') = 1" if _sqlite()
               else "(metrics::jsonb -> 'rejected') = 'true'::jsonb")
    op.execute(f"UPDATE checkpoints SET status = 'rejected' WHERE status = 'retired' AND {flagged}")


def downgrade() -> None:
    marked = ("json_set(metrics, '$.rejected', json('true'))" if _sqlite()
              else """(metrics::jsonb || '{"rejected": true}'::jsonb)::json""")
    op.execute(f"UPDATE checkpoints SET status = 'retired', metrics = {marked} WHERE status = 'rejected'")
    op.execute(f"DELETE FROM moderation_actions WHERE action IN ({MODEL_ACTIONS})")
    _rebuild_check("moderation_actions", "action", ACTION_OLD)
    _rebuild_check("checkpoints", "status", STATUS_OLD)
