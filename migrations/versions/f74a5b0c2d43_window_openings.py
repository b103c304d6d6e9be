"""window openings

Revision ID: f74a5b0c2d43
Revises: e63f4a9b1c32
Create Date: 2026-12-02 15:05:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'f74a5b0c2d43'
down_revision = 'e63f4a9b1c32'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('window_openings',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('opened_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )


def downgrade():
    op.drop_table('window_openings')
