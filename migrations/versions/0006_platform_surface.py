"""model choice, a channel's streaming mode, and stop requests that cross workers

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 06:45:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The model a conversation was switched to (``model`` command); NULL: the channel's default,
    # else the deployment's.
    op.add_column("conversations", sa.Column("model", sa.String(length=200), nullable=True))
    # A channel's defaults for new threads: its model, and how answers stream there
    # (native | update | auto; NULL: the deployment's SLACK_STREAMING).
    op.add_column("channel_settings", sa.Column("model", sa.String(length=200), nullable=True))
    op.add_column("channel_settings", sa.Column("streaming", sa.String(length=16), nullable=True))
    # Someone asked to stop this turn's answer (a stop button); the worker answering it, which
    # may be another process, stops when it sees this.
    op.add_column(
        "turns", sa.Column("stop_requested_at", sa.DateTime(timezone=True), nullable=True)
    )


def downgrade() -> None:
    op.drop_column("turns", "stop_requested_at")
    op.drop_column("channel_settings", "streaming")
    op.drop_column("channel_settings", "model")
    op.drop_column("conversations", "model")
