"""series selection: the MRI series selection report of a job (one study revision), stored with its results

Additive: one nullable JSON column on jobs; NULL for radiograph jobs and for jobs recorded before this revision.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 14:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('series_selection', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('series_selection')
