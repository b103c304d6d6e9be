"""blocked networks

Revision ID: e63f4a9b1c32
Revises: d52e3f8a0b21
Create Date: 2026-12-02 14:35:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'e63f4a9b1c32'
down_revision = 'd52e3f8a0b21'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('blocked_networks',
    sa.Column('network', sa.String(length=50), nullable=False),
    sa.Column('note', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('network')
    )


def downgrade():
    op.drop_table('blocked_networks')
