"""intake kind: what the receiver decided an instance is (image, non_image, own_result, ai_result) and why

Additive: two nullable columns; NULL (rows indexed before this revision) counts as an image.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 10:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('intake_kind', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('intake_reason', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_column('intake_reason')
        batch_op.drop_column('intake_kind')
