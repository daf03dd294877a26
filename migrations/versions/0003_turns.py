"""durable turns: a record per accepted question, and the outcome of each message

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 04:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    # One row per accepted question, from intake to its outcome. A worker answering it holds a
    # lease (worker, lease_until); a live worker takes over a turn whose lease expired.
    op.create_table(
        "turns",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("conversation_id", BigId, nullable=False),
        sa.Column("platform", sa.String(length=32), nullable=False),
        sa.Column("event_key", sa.String(length=255), nullable=True),
        sa.Column("user_id", sa.String(length=128), nullable=True),
        sa.Column("question", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reply_to", sa.Text(), nullable=True),
        sa.Column("reply_message_ids", sa.Text(), nullable=True),
        sa.Column("worker", sa.String(length=64), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("takeovers", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("finish_reason", sa.String(length=32), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversations.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_turns_open", "turns", ["status", "lease_until"])
    op.create_index("ix_turns_conversation", "turns", ["conversation_id", "id"])
    # What became of each message: NULL for an ordinary one; "failed" for a question whose turn
    # failed (never sent again), "stopped", "cut" or "interrupted" for an answer kept as shown,
    # "replaced" for an answer a later one replaced. finish_reason is the provider's.
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("status", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("finish_reason", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("turn_id", BigId, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("turn_id")
        batch.drop_column("finish_reason")
        batch.drop_column("status")
    op.drop_index("ix_turns_conversation", table_name="turns")
    op.drop_index("ix_turns_open", table_name="turns")
    op.drop_table("turns")
