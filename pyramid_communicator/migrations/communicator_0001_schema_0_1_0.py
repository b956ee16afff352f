"""pyramid_communicator 0.1.0: the queues, the mappings and the state.

The base of the ``communicator`` branch.  A database whose four tables
were made by ``metadata.create_all`` under 0.1.0 is taken over as it is:
this revision then creates nothing, and the next ones upgrade it.

Revision ID: communicator_0001
Revises:
Create Date: 2026-11-30
"""
import sqlalchemy as sa
from alembic import context, op
from alembic.util import CommandError
from sqlalchemy.dialects import mysql

revision = 'communicator_0001'
down_revision = None
branch_labels = ('communicator',)
depends_on = None

# The types as 0.1.0 declared them (revisions never import models.py: it
# moves on, a revision must not).
BodyText = sa.Text().with_variant(mysql.LONGTEXT(), 'mysql', 'mariadb')
QueueId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')
Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), 'mysql', 'mariadb')

TABLES = ('outbound_messages', 'inbound_messages', 'communicator_mappings',
          'communicator_state')


def _existing() -> set[str]:
    """Which of our 0.1.0 tables exist; raises when they are not exactly a
    0.1.0 schema (some missing, or already 0.2.0)."""
    inspector = sa.inspect(op.get_bind())
    found = set(TABLES) & set(inspector.get_table_names())
    if found and found != set(TABLES):
        raise CommandError(
            f'pyramid_communicator: found only {sorted(found)} of {list(TABLES)}; '
            'create the missing ones (or drop these) before upgrading')
    if found and 'version' in {c['name'] for c in inspector.get_columns('outbound_messages')}:
        # Two ways to get here, told apart by nobody but the operator: a
        # test teardown that drops the host's tables and purges
        # alembic_version but leaves ours (the Pyramid cookiecutter's
        # conftest does, and stamping would then keep stale rows), or a
        # create_all of 0.2.0 that was never stamped.
        raise CommandError(
            'pyramid_communicator: our tables exist (of version 0.2.0 or later) but '
            'alembic_version does not list the communicator branch. Left over by a '
            'test teardown that dropped only the app\'s tables and purged '
            'alembic_version (the Pyramid cookiecutter\'s conftest)? Drop them there '
            'too: pyramid_communicator.models.metadata.drop_all(engine) (see '
            '"Testing your host app" in the docs). Made by metadata.create_all '
            'instead? Mark them as current with "alembic stamp communicator@head" '
            'rather than upgrading them')
    return found


def upgrade() -> None:
    if not context.is_offline_mode() and _existing():
        return  # 0.1.0's create_all made them: take them over as they are
    op.create_table(
        'outbound_messages',
        sa.Column('id', QueueId, autoincrement=True, nullable=False),
        sa.Column('body', BodyText, nullable=False),
        sa.Column('origin', sa.String(64), nullable=True),
        sa.Column('original_id', sa.BigInteger(), nullable=True),
        sa.Column('refs', sa.Text(), nullable=True),
        sa.Column('created_at', Timestamp, nullable=False),
        sa.Column('delivered_at', Timestamp, nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_outbound_messages')),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f('ix_outbound_messages_pending'), 'outbound_messages',
                    ['delivered_at', 'id'])
    op.create_table(
        'inbound_messages',
        sa.Column('id', QueueId, autoincrement=True, nullable=False),
        sa.Column('sender', sa.String(255), nullable=False),
        sa.Column('remote_id', sa.BigInteger(), nullable=False),
        sa.Column('body', BodyText, nullable=False),
        sa.Column('origin', sa.String(64), nullable=True),
        sa.Column('original_id', sa.BigInteger(), nullable=True),
        sa.Column('refs', sa.Text(), nullable=True),
        sa.Column('created_at', Timestamp, nullable=False),
        sa.Column('processed_at', Timestamp, nullable=True),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.Column('failed_at', Timestamp, nullable=True),
        sa.Column('given_up_at', Timestamp, nullable=True),
        sa.Column('given_up_by', sa.String(255), nullable=True),
        sa.Column('given_up_reason', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_inbound_messages')),
        sa.UniqueConstraint('sender', 'remote_id', name=op.f('uq_inbound_messages_sender')),
    )
    op.create_index(op.f('ix_inbound_messages_pending'), 'inbound_messages',
                    ['processed_at', 'id'])
    op.create_table(
        'communicator_mappings',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('name', sa.String(64), nullable=False),
        sa.Column('origin', sa.String(64), nullable=False),
        sa.Column('original_id', sa.BigInteger(), nullable=False),
        sa.Column('local_id', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_communicator_mappings')),
        sa.UniqueConstraint('name', 'origin', 'original_id',
                            name=op.f('uq_communicator_mappings_name')),
    )
    op.create_index(op.f('ix_communicator_mappings_local'), 'communicator_mappings',
                    ['name', 'local_id'])
    op.create_table(
        'communicator_state',
        sa.Column('key', sa.String(64), nullable=False),
        sa.Column('value', sa.String(255), nullable=True),
        sa.Column('updated_at', Timestamp, nullable=False),
        sa.PrimaryKeyConstraint('key', name=op.f('pk_communicator_state')),
    )


def downgrade() -> None:
    for table in reversed(TABLES):
        op.drop_table(table)
