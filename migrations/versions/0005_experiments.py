"""feedback on answers and prompt experiments

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 05:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    # Feedback is append-only: every click is a row; a user's latest click on a reply counts.
    op.create_table(
        "feedback",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("message_id", BigId, nullable=False),
        sa.Column("conversation_id", BigId, nullable=False),
        sa.Column("platform", sa.String(length=32), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("value", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["message_id"], ["messages.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversations.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_feedback_message", "feedback", ["message_id", "user_id", "id"])
    # An experiment compares system prompts (variants, JSON: [{"name", "prompt", "weight"}])
    # across new conversations of its scope: the deployment (channels NULL) or some channels.
    op.create_table(
        "experiments",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("seed", sa.String(length=64), nullable=False),
        sa.Column("variants", sa.Text(), nullable=False),
        sa.Column("channels", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("shipped", sa.String(length=100), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name", name="uq_experiment_name"),
    )
    # A conversation's variant, chosen once and kept (or its exclusion: it had its own prompt).
    op.create_table(
        "experiment_assignments",
        sa.Column("experiment_id", BigId, nullable=False),
        sa.Column("conversation_id", BigId, nullable=False),
        sa.Column("variant", sa.String(length=100), nullable=True),
        sa.Column("excluded", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["experiment_id"], ["experiments.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversations.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("experiment_id", "conversation_id"),
    )
    # The deployment's own default system prompt (a shipped variant), over SYSTEM_PROMPT.
    op.create_table(
        "deployment_settings",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    # Every reply's exposure: which experiment and variant, and the prompt's version (a hash).
    with op.batch_alter_table("turns") as batch:
        batch.add_column(sa.Column("experiment_id", BigId, nullable=True))
        batch.add_column(sa.Column("variant", sa.String(length=100), nullable=True))
        batch.add_column(sa.Column("prompt_version", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("first_token_ms", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("turns") as batch:
        batch.drop_column("first_token_ms")
        batch.drop_column("prompt_version")
        batch.drop_column("variant")
        batch.drop_column("experiment_id")
    op.drop_table("deployment_settings")
    op.drop_table("experiment_assignments")
    op.drop_table("experiments")
    op.drop_index("ix_feedback_message", table_name="feedback")
    op.drop_table("feedback")
