"""pyramid_communicator: records of any primary key (issue 16, item 1).

A keyed record (a UUID, string, app-chosen or composite primary key) is
found again from its mapping row by ``local_key``, its key as canonical
text; ``local_id`` holds the key's integer handle (see
:mod:`pyramid_communicator.keys`).  Nullable, and NULL for every existing
row: every record synced so far has an integer surrogate key.  Lookups go
by ``(name, local_id)``, already indexed, so the column needs no index.

Revision ID: communicator_0004
Revises: communicator_0003
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = 'communicator_0004'
down_revision = 'communicator_0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('communicator_mappings') as batch:
        batch.add_column(sa.Column('local_key', sa.String(255), nullable=True))


def downgrade() -> None:
    # Mappings of keyed records cannot be read without their key: 0.2.0
    # knows only integer keys, and would take the handle for one.
    op.execute(sa.text('DELETE FROM communicator_mappings WHERE local_key IS NOT NULL'))
    with op.batch_alter_table('communicator_mappings') as batch:
        batch.drop_column('local_key')
