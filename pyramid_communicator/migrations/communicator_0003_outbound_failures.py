"""pyramid_communicator: outbound messages the peer refuses for good are
set aside (``attempts``, ``last_error``, ``failed_at``) and can be given up
on (``given_up_at``, ``given_up_by``, ``given_up_reason``), as inbound
messages already can.

All columns are nullable and no row needs a value: every existing message
is simply not set aside.

Revision ID: communicator_0003
Revises: communicator_0002
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = 'communicator_0003'
down_revision = 'communicator_0002'
branch_labels = None
depends_on = None

Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), 'mysql', 'mariadb')

outbound = sa.table('outbound_messages', sa.column('delivered_at', sa.DateTime()),
                    sa.column('given_up_at', sa.DateTime()))


def upgrade() -> None:
    # SQLite: batch mode copies the table, keeping AUTOINCREMENT (the ids
    # of the outbound queue must never be handed out twice).
    with op.batch_alter_table('outbound_messages',
                              table_kwargs={'sqlite_autoincrement': True}) as batch:
        batch.add_column(sa.Column('attempts', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('last_error', sa.Text(), nullable=True))
        batch.add_column(sa.Column('failed_at', Timestamp, nullable=True))
        batch.add_column(sa.Column('given_up_at', Timestamp, nullable=True))
        batch.add_column(sa.Column('given_up_by', sa.String(255), nullable=True))
        batch.add_column(sa.Column('given_up_reason', sa.Text(), nullable=True))


def downgrade() -> None:
    # A message given up on must never go, and 0.2.0 without these columns
    # would push it again: it counts as delivered instead.  Set-aside ones
    # become plain pending messages (and hold up the push again).
    op.execute(outbound.update()
               .where(outbound.c.delivered_at.is_(None), outbound.c.given_up_at.is_not(None))
               .values(delivered_at=outbound.c.given_up_at))
    with op.batch_alter_table('outbound_messages',
                              table_kwargs={'sqlite_autoincrement': True}) as batch:
        batch.drop_column('given_up_reason')
        batch.drop_column('given_up_by')
        batch.drop_column('given_up_at')
        batch.drop_column('failed_at')
        batch.drop_column('last_error')
        batch.drop_column('attempts')
