"""budgets

Revision ID: d52e3f8a0b21
Revises: c41d2e7f9a10
Create Date: 2026-12-02 14:30:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'd52e3f8a0b21'
down_revision = 'c41d2e7f9a10'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('token_usage',
    sa.Column('user', sa.String(length=200), nullable=False),
    sa.Column('period', sa.String(length=10), nullable=False),
    sa.Column('tokens', sa.Double(), nullable=False),
    sa.PrimaryKeyConstraint('user', 'period')
    )
    with op.batch_alter_table('user_settings', schema=None) as batch_op:
        batch_op.add_column(sa.Column('requests_per_minute', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('tokens_per_day', sa.Double(), nullable=True))
        batch_op.add_column(sa.Column('tokens_per_month', sa.Double(), nullable=True))


def downgrade():
    with op.batch_alter_table('user_settings', schema=None) as batch_op:
        batch_op.drop_column('tokens_per_month')
        batch_op.drop_column('tokens_per_day')
        batch_op.drop_column('requests_per_minute')
    op.drop_table('token_usage')
