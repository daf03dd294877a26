"""usage and cost per turn: tokens, whether they were estimated, the model, the price paid

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 04:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A turn's usage lives on its record: every accepted question has one (a failed turn too,
    # which has no answer message), and daily limits sum them by user or channel for today.
    # NULL tokens: the model was never called (a command, a refusal). ``refused`` names the limit
    # that turned a question away ("user_daily", "channel_daily", "rate").
    with op.batch_alter_table("turns") as batch:
        batch.add_column(sa.Column("model", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("input_tokens", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("output_tokens", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("tokens_estimated", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("cost_usd", sa.Double(), nullable=True))
        batch.add_column(sa.Column("refused", sa.String(length=16), nullable=True))
    op.create_index("ix_turns_user_time", "turns", ["platform", "user_id", "created_at"])
    op.create_index("ix_turns_created", "turns", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_turns_created", table_name="turns")
    op.drop_index("ix_turns_user_time", table_name="turns")
    with op.batch_alter_table("turns") as batch:
        batch.drop_column("refused")
        batch.drop_column("cost_usd")
        batch.drop_column("tokens_estimated")
        batch.drop_column("output_tokens")
        batch.drop_column("input_tokens")
        batch.drop_column("model")
