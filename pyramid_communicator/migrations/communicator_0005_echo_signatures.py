"""pyramid_communicator: record messages carry their origin's signature
(``signature``, HMAC-SHA256 in hex), kept with an inbound message so that
the peer can echo a restored side's own lost messages back to it, and
with an outbound one that is such an echo (see :mod:`pyramid_communicator.echoes`).

Both columns are nullable: messages stored before, and those of a gem
peer, have none (an echo of them is refused, as an unsigned one).

Revision ID: communicator_0005
Revises: communicator_0004
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = 'communicator_0005'
down_revision = 'communicator_0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('inbound_messages') as batch:
        batch.add_column(sa.Column('signature', sa.String(64), nullable=True))
    # SQLite: batch mode copies the table, keeping AUTOINCREMENT (the ids
    # of the outbound queue must never be handed out twice).
    with op.batch_alter_table('outbound_messages',
                              table_kwargs={'sqlite_autoincrement': True}) as batch:
        batch.add_column(sa.Column('signature', sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('outbound_messages',
                              table_kwargs={'sqlite_autoincrement': True}) as batch:
        batch.drop_column('signature')
    with op.batch_alter_table('inbound_messages') as batch:
        batch.drop_column('signature')
