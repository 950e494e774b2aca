"""SQLite: generation and image ids are never reused (AUTOINCREMENT)

Results can now be deleted (the author's 🗑, ``/dalle-privacy delete``). Without AUTOINCREMENT, SQLite hands the
largest deleted id to the next row, and the buttons of the deleted result's old messages would then act on a new
generation or image. The tables are rebuilt on SQLite with their data; PostgreSQL's sequences never reuse an id, so
nothing changes there.

Revision ID: a3c7e9f1b5d8
Revises: d6a2f8c4e0b5
Create Date: 2026-12-07 10:00:00

"""
from collections.abc import Sequence

from alembic import op

revision: str = "a3c7e9f1b5d8"
down_revision: str | Sequence[str] | None = "d6a2f8c4e0b5"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("generations", "images")


def _rebuild(autoincrement: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in TABLES:
        with op.batch_alter_table(table, recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}):
            pass


def upgrade() -> None:
    _rebuild(True)


def downgrade() -> None:
    _rebuild(False)
