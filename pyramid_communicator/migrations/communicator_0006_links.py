"""pyramid_communicator: many-to-many links travel as membership changes;
``communicator_links`` keeps the last change of each link (whether it is
there, and the stamp of that edit), so that a late or repeated message
never brings a removed link back.

A new table: no existing row changes.

Revision ID: communicator_0006
Revises: communicator_0005
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = 'communicator_0006'
down_revision = 'communicator_0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'communicator_links',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('name', sa.String(255), nullable=False),
        sa.Column('owner_id', sa.BigInteger(), nullable=False),
        sa.Column('target_id', sa.BigInteger(), nullable=False),
        sa.Column('linked', sa.Integer(), nullable=False),
        sa.Column('hlc', sa.BigInteger(), nullable=False),
        sa.Column('app', sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_communicator_links')),
        sa.UniqueConstraint('name', 'owner_id', 'target_id',
                            name=op.f('uq_communicator_links_name')),
    )


def downgrade() -> None:
    op.drop_table('communicator_links')
