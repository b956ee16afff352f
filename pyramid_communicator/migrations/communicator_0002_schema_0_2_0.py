"""pyramid_communicator 0.2.0: versions, conflicts, tombstones, refused
messages, message formats; self rows for the records 0.1.0 published.

Every record of ours that 0.1.0 published with its id gets its row
``(name, '', id, id)`` in ``communicator_mappings``: 0.2.0 applies a
peer's update of one of our records only if that row says we published
it.  The rows come from ``outbound_messages`` (origin NULL: our own
records; the body names the model).

Revision ID: communicator_0002
Revises: communicator_0001
Create Date: 2026-11-30
"""
import json

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import mysql

revision = 'communicator_0002'
down_revision = 'communicator_0001'
branch_labels = None
depends_on = None

BodyText = sa.Text().with_variant(mysql.LONGTEXT(), 'mysql', 'mariadb')
QueueId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')
Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), 'mysql', 'mariadb')

outbound = sa.table('outbound_messages', sa.column('id', sa.BigInteger()),
                    sa.column('body', sa.Text()), sa.column('origin', sa.String()),
                    sa.column('original_id', sa.BigInteger()))
mappings = sa.table('communicator_mappings', sa.column('name', sa.String()),
                    sa.column('origin', sa.String()), sa.column('original_id', sa.BigInteger()),
                    sa.column('local_id', sa.BigInteger()), sa.column('version', sa.Text()),
                    sa.column('life', sa.Integer()))
state = sa.table('communicator_state', sa.column('key', sa.String()))

#: Outbound rows read per query by the backfill.
PAGE = 1000


def upgrade() -> None:
    # SQLite cannot ALTER most of this: batch mode copies those tables
    # (keeping AUTOINCREMENT on the outbound queue, whose ids must never
    # be handed out twice); the other databases ALTER in place.
    with op.batch_alter_table('outbound_messages',
                              table_kwargs={'sqlite_autoincrement': True}) as batch:
        batch.add_column(sa.Column('version', BodyText, nullable=True))
        batch.add_column(sa.Column('format', sa.Integer(), nullable=False,
                                   server_default='1'))
    with op.batch_alter_table('inbound_messages') as batch:
        batch.add_column(sa.Column('version', BodyText, nullable=True))
        batch.add_column(sa.Column('refused_at', Timestamp, nullable=True))
        batch.add_column(sa.Column('format', sa.Integer(), nullable=False,
                                   server_default='1'))
    with op.batch_alter_table('communicator_mappings') as batch:
        batch.alter_column('local_id', existing_type=sa.BigInteger(), nullable=True)
        batch.add_column(sa.Column('version', BodyText, nullable=True))
        batch.add_column(sa.Column('life', sa.Integer(), nullable=False, server_default='0'))
    with op.batch_alter_table('communicator_mappings') as batch:
        # The default only filled the existing rows; the add-on writes life.
        batch.alter_column('life', existing_type=sa.Integer(), existing_nullable=False,
                           server_default=None)
    with op.batch_alter_table('communicator_state') as batch:
        batch.alter_column('key', existing_type=sa.String(64), type_=sa.String(255),
                           existing_nullable=False)
    op.create_table(
        'communicator_conflicts',
        sa.Column('id', QueueId, autoincrement=True, nullable=False),
        sa.Column('name', sa.String(64), nullable=False),
        sa.Column('origin', sa.String(64), nullable=True),
        sa.Column('original_id', sa.BigInteger(), nullable=True),
        sa.Column('local_id', sa.BigInteger(), nullable=True),
        sa.Column('attribute', sa.String(255), nullable=True),
        sa.Column('local_value', sa.Text(), nullable=True),
        sa.Column('remote_value', sa.Text(), nullable=True),
        sa.Column('kept_value', sa.Text(), nullable=True),
        sa.Column('local_stamp', sa.String(100), nullable=True),
        sa.Column('remote_stamp', sa.String(100), nullable=True),
        sa.Column('winner', sa.String(16), nullable=False),
        sa.Column('policy', sa.String(64), nullable=False),
        sa.Column('peer', sa.String(255), nullable=False),
        sa.Column('created_at', Timestamp, nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_communicator_conflicts')),
    )
    op.create_index(op.f('ix_communicator_conflicts_created'), 'communicator_conflicts',
                    ['created_at'])
    op.create_table(
        'communicator_natural_tombstones',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('name', sa.String(64), nullable=False),
        sa.Column('natural_key', sa.String(32), nullable=False),
        sa.Column('version', BodyText, nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_communicator_natural_tombstones')),
        sa.UniqueConstraint('name', 'natural_key',
                            name=op.f('uq_communicator_natural_tombstones_name')),
    )
    if context.is_offline_mode():
        op.get_context().impl.static_output(
            '-- pyramid_communicator: the self rows of communicator_mappings for records '
            'published under 0.1.0 are derived from outbound_messages online only; '
            'run this revision online, or publish those records again')
    else:
        _backfill_self_rows(op.get_bind())


def _record_name(body: str) -> str | None:
    """The model name a 0.1.0 body (``{"<name>": {...}}``) names, if any."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if isinstance(data, dict) and len(data) == 1:
        (name,) = data
        if 0 < len(name) <= 64:
            return name
    return None


def _backfill_self_rows(connection: sa.Connection) -> None:
    """``(name, '', id, id)`` for every record of ours that went out with
    its id (origin NULL, original_id set), once; version NULL (it gets one
    when next published or changed by the peer), life 0."""
    known = {tuple(row) for row in connection.execute(
        sa.select(mappings.c.name, mappings.c.original_id).where(mappings.c.origin == ''))}
    after = None
    while True:
        query = (sa.select(outbound.c.id, outbound.c.body, outbound.c.original_id)
                 .where(outbound.c.origin.is_(None), outbound.c.original_id.is_not(None))
                 .order_by(outbound.c.id).limit(PAGE))
        if after is not None:
            query = query.where(outbound.c.id > after)
        rows = connection.execute(query).all()
        if not rows:
            return
        after = rows[-1].id
        new = []
        for row in rows:
            name = _record_name(row.body)
            if name is None or (name, row.original_id) in known:
                continue
            known.add((name, row.original_id))
            new.append({'name': name, 'origin': '', 'original_id': row.original_id,
                        'local_id': row.original_id, 'version': None, 'life': 0})
        if new:
            connection.execute(mappings.insert(), new)


def downgrade() -> None:
    op.drop_table('communicator_natural_tombstones')
    op.drop_table('communicator_conflicts')
    # 0.1.0 neither knows nor needs the longer keys (purge watermarks,
    # seeding progress), nor the self rows and tombstones of mappings.
    op.execute(state.delete().where(sa.func.length(state.c.key) > 64))
    with op.batch_alter_table('communicator_state') as batch:
        batch.alter_column('key', existing_type=sa.String(255), type_=sa.String(64),
                           existing_nullable=False)
    op.execute(mappings.delete().where(sa.or_(mappings.c.origin == '',
                                              mappings.c.local_id.is_(None))))
    with op.batch_alter_table('communicator_mappings') as batch:
        batch.drop_column('life')
        batch.drop_column('version')
        batch.alter_column('local_id', existing_type=sa.BigInteger(), nullable=False)
    with op.batch_alter_table('inbound_messages') as batch:
        batch.drop_column('format')
        batch.drop_column('refused_at')
        batch.drop_column('version')
    with op.batch_alter_table('outbound_messages',
                              table_kwargs={'sqlite_autoincrement': True}) as batch:
        batch.drop_column('format')
        batch.drop_column('version')
