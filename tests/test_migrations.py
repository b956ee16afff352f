"""The add-on's Alembic branch, in a host app with its own Alembic
environment: the demo app's tables made by a revision of the host's, ours
by the ``communicator`` branch found through the version location
``pyramid_communicator:migrations``, driven through Alembic's command API
exactly as ``alembic -c alembic.ini ...`` would run them.
"""
from __future__ import annotations

import datetime
import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path

import alembic
import pytest
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from conftest import Side
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    inspect,
    text,
)
from sqlalchemy.dialects import mysql
from test_end_to_end import comment, posts_by_title, summary

from pyramid_communicator import models
from pyramid_communicator.demo.models import Post

#: The add-on's newest revision.
HEAD = 'communicator_0006'

ENV_PY = '''\
from alembic import context
from sqlalchemy import engine_from_config, pool

import pyramid_communicator.migrations
import pyramid_communicator.models
from pyramid_communicator.demo.models import Base

config = context.config
target_metadata = [Base.metadata, pyramid_communicator.models.metadata]
if config.get_main_option('host_metadata_only'):  # the cookiecutter's env.py as it comes
    target_metadata = Base.metadata
# The README's option: autogenerate and check leave our tables alone.
include_object = (pyramid_communicator.migrations.include_object
                  if config.get_main_option('ignore_communicator_tables') else None)


def run_migrations_offline():
    context.configure(url=config.get_main_option('sqlalchemy.url'),
                      target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online():
    engine = engine_from_config(config.get_section(config.config_ini_section),
                                prefix='sqlalchemy.', poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata,
                          compare_type=True, include_object=include_object)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
'''

HOST_REVISION = '''\
"""The host's own tables (the demo app's).

Revision ID: host_0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = 'host_0001'
down_revision = None
branch_labels = ('host',)
depends_on = None


def upgrade():
    op.create_table(
        'posts',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('title', sa.String(200), nullable=False),
        sa.Column('body', sa.Text(), nullable=True),
        sa.Column('slug', sa.String(100), nullable=True),
        sa.Column('published_on', sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_posts')),
        sa.UniqueConstraint('slug', name=op.f('uq_posts_slug')),
    )
    op.create_table(
        'comments',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('post_id', sa.Integer(), nullable=True),
        sa.Column('title', sa.String(200), nullable=True),
        sa.Column('body', sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(['post_id'], ['posts.id'],
                                name=op.f('fk_comments_post_id_posts')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_comments')),
    )
    op.create_table(
        'tags',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(100), nullable=False),
        sa.Column('label', sa.String(200), nullable=True),
        sa.Column('color', sa.String(20), nullable=True),
        sa.Column('weight', sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_tags')),
        sa.UniqueConstraint('name', name=op.f('uq_tags_name')),
    )
    op.create_table(
        'post_tags',
        sa.Column('post_id', sa.Integer(), nullable=False),
        sa.Column('tag_id', sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(['post_id'], ['posts.id'],
                                name=op.f('fk_post_tags_post_id_posts')),
        sa.ForeignKeyConstraint(['tag_id'], ['tags.id'],
                                name=op.f('fk_post_tags_tag_id_tags')),
        sa.PrimaryKeyConstraint('post_id', 'tag_id', name=op.f('pk_post_tags')),
    )
    op.create_table(
        'notes',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('title', sa.String(200), nullable=True),
        sa.Column('body', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_notes')),
    )
    op.create_table(
        'contact_requests',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(200), nullable=False),
        sa.Column('email', sa.String(200), nullable=False),
        sa.Column('text', sa.Text(), nullable=False),
        sa.Column('status', sa.String(20), nullable=False),
        sa.Column('origin', sa.String(64), nullable=True),
        sa.Column('message_id', sa.Integer(), nullable=True),
        sa.Column('ref', sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_contact_requests')),
    )


def downgrade():
    op.drop_table('contact_requests')
    op.drop_table('notes')
    op.drop_table('post_tags')
    op.drop_table('tags')
    op.drop_table('comments')
    op.drop_table('posts')
'''


def host(tmp_path: Path, url: str) -> Config:
    """A host app's Alembic environment, configured as the README says."""
    root = tmp_path / 'host'
    (root / 'alembic' / 'versions').mkdir(parents=True)
    (root / 'alembic' / 'env.py').write_text(ENV_PY)
    (root / 'alembic' / 'script.py.mako').write_text(
        (Path(alembic.__file__).parent / 'templates' / 'generic' / 'script.py.mako').read_text())
    (root / 'alembic' / 'versions' / 'host_0001_demo_tables.py').write_text(HOST_REVISION)
    ini = root / 'alembic.ini'
    ini.write_text(textwrap.dedent(f'''\
        [alembic]
        script_location = %(here)s/alembic
        version_locations = %(here)s/alembic/versions pyramid_communicator:migrations
        path_separator = space
        sqlalchemy.url = {url}
        '''))
    return Config(str(ini))


def heads(config: Config, url: str) -> set[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {row[0] for row in conn.execute(text('SELECT version_num FROM alembic_version'))}
    finally:
        engine.dispose()


def schema(url: str, names: Iterable[str] = models.metadata.tables) -> dict[str, dict]:
    """Our tables as the database reports them, down to what ``alembic
    check`` does not compare (MySQL's fractional seconds, defaults)."""
    engine = create_engine(url)
    found = {}
    try:
        inspector = inspect(engine)
        for table in sorted(names):
            found[table] = {
                'columns': {c['name']: (repr(c['type']), c['nullable'], c.get('default'))
                            for c in inspector.get_columns(table)},
                'pk': inspector.get_pk_constraint(table)['constrained_columns'],
                'indexes': sorted((i['name'], tuple(i['column_names']), bool(i['unique']))
                                  for i in inspector.get_indexes(table)),
                'unique': sorted((u['name'], tuple(u['column_names']))
                                 for u in inspector.get_unique_constraints(table)),
            }
            if engine.dialect.name == 'sqlite':
                with engine.connect() as conn:
                    ddl = conn.execute(text('SELECT sql FROM sqlite_master WHERE name = :t'),
                                       {'t': table}).scalar()
                found[table]['autoincrement'] = 'AUTOINCREMENT' in ddl
    finally:
        engine.dispose()
    return found


@pytest.fixture(scope='module')
def created_schema(databases) -> dict[str, dict]:
    """Our tables as ``metadata.create_all`` makes them: what the
    revisions must arrive at."""
    url = databases.url('migrate_reference')
    engine = create_engine(url)
    models.metadata.create_all(engine)
    engine.dispose()
    return schema(url)


@pytest.fixture(scope='module')
def created_010_schema(databases) -> dict[str, dict]:
    """Our tables as 0.1.0's ``metadata.create_all`` made them."""
    url = databases.url('migrate_reference_010')
    engine = create_engine(url)
    V010.create_all(engine)
    engine.dispose()
    return schema(url, V010.tables)


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


# -- the tables a 0.1.0 host made with metadata.create_all -------------------
# (a copy of 0.1.0's models.py, independent of the revisions under test)

V010 = MetaData(naming_convention=models.NAMING_CONVENTION)
_Body = Text().with_variant(mysql.LONGTEXT(), 'mysql', 'mariadb')
_QueueId = BigInteger().with_variant(Integer(), 'sqlite')
_Time = DateTime().with_variant(mysql.DATETIME(fsp=6), 'mysql', 'mariadb')
OUT_010 = Table(
    'outbound_messages', V010,
    Column('id', _QueueId, primary_key=True, autoincrement=True),
    Column('body', _Body, nullable=False),
    Column('origin', String(64)), Column('original_id', BigInteger), Column('refs', Text),
    Column('created_at', _Time, nullable=False), Column('delivered_at', _Time),
    Index('ix_outbound_messages_pending', 'delivered_at', 'id'),
    sqlite_autoincrement=True)
IN_010 = Table(
    'inbound_messages', V010,
    Column('id', _QueueId, primary_key=True, autoincrement=True),
    Column('sender', String(255), nullable=False),
    Column('remote_id', BigInteger, nullable=False),
    Column('body', _Body, nullable=False),
    Column('origin', String(64)), Column('original_id', BigInteger), Column('refs', Text),
    Column('created_at', _Time, nullable=False), Column('processed_at', _Time),
    Column('attempts', Integer, nullable=False), Column('last_error', Text),
    Column('failed_at', _Time), Column('given_up_at', _Time),
    Column('given_up_by', String(255)), Column('given_up_reason', Text),
    UniqueConstraint('sender', 'remote_id'),
    Index('ix_inbound_messages_pending', 'processed_at', 'id'))
MAPPINGS_010 = Table(
    'communicator_mappings', V010,
    Column('id', Integer, primary_key=True, autoincrement=True),
    Column('name', String(64), nullable=False), Column('origin', String(64), nullable=False),
    Column('original_id', BigInteger, nullable=False),
    Column('local_id', BigInteger, nullable=False),
    UniqueConstraint('name', 'origin', 'original_id'),
    Index('ix_communicator_mappings_local', 'name', 'local_id'))
STATE_010 = Table(
    'communicator_state', V010,
    Column('key', String(64), primary_key=True), Column('value', String(255)),
    Column('updated_at', _Time, nullable=False))


def post_body(title: str, body: str | None = None) -> str:
    """A post as 0.1.0 put it on the wire."""
    return json.dumps({'post': {'title': title, 'body': body, 'slug': None,
                                'published_on': None}}, separators=(',', ':'))


# -- tests ----------------------------------------------------------------------

def test_the_addon_imports_without_alembic():
    blocked = ("import sys; sys.modules['alembic'] = None; "
               "import pyramid_communicator, pyramid_communicator.migrations, "
               "pyramid_communicator.demo.models, pyramid_communicator.scripts.pcommunicate")
    result = subprocess.run([sys.executable, '-c', blocked], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_upgrade_heads_on_an_empty_database_yields_exactly_the_metadata(databases, tmp_path,
                                                                         created_schema):
    url = databases.url('migrate_empty')
    config = host(tmp_path, url)
    script = ScriptDirectory.from_config(config)
    assert set(script.get_bases()) == {'host_0001', 'communicator_0001'}
    assert script.get_revision('communicator_0001').branch_labels == {'communicator'}
    assert script.get_revision('communicator@head').revision == HEAD

    command.upgrade(config, 'heads')

    command.check(config)  # raises AutogenerateDiffsDetected on any difference
    assert heads(config, url) == {'host_0001', HEAD}
    assert schema(url) == created_schema
    assert {'posts', 'comments', 'tags', 'post_tags', 'notes'} <= tables(url)


def test_downgrade_to_the_branch_base_and_up_again(databases, tmp_path, created_schema,
                                                   created_010_schema):
    url = databases.url('migrate_downgrade')
    config = host(tmp_path, url)
    command.upgrade(config, 'heads')
    side = Side('central', url, create_engine(url))
    now = datetime.datetime(2026, 11, 30, 6, 0)
    with side.engine.begin() as conn:
        conn.execute(models.outbound_messages.insert().values(
            body=post_body('kept'), original_id=1, created_at=now, format=2))
        conn.execute(models.communicator_mappings.insert(), [
            {'name': 'post', 'origin': '', 'original_id': 1, 'local_id': 1, 'life': 0},
            {'name': 'post', 'origin': 'facade', 'original_id': 5, 'local_id': 2, 'life': 0},
            {'name': 'tag', 'origin': 'facade', 'original_id': 6, 'local_id': None,
             'life': 1}])
        conn.execute(models.communicator_state.insert(), [
            {'key': 'last_push', 'value': 'x', 'updated_at': now},
            {'key': 'publish_all:' + 'n' * 100, 'value': '7', 'updated_at': now}])
        conn.execute(models.communicator_conflicts.insert().values(
            name='post', winner='local', policy='newest', peer='facade', created_at=now))

    command.downgrade(config, 'communicator_0001')  # back to 0.1.0's schema

    assert heads(config, url) == {'host_0001', 'communicator_0001'}
    assert schema(url, V010.tables) == created_010_schema
    assert [(r['body'], r['original_id']) for r in side.rows('outbound_messages')] == [
        (post_body('kept'), 1)]
    assert [(r['name'], r['origin'], r['original_id'], r['local_id'])
            for r in side.rows('communicator_mappings')] == [('post', 'facade', 5, 2)]
    assert [r['key'] for r in side.rows('communicator_state', 'updated_at')] == ['last_push']
    assert not tables(url) & {'communicator_conflicts', 'communicator_natural_tombstones'}

    command.downgrade(config, 'communicator@base')

    assert heads(config, url) == {'host_0001'}
    assert tables(url) & set(models.metadata.tables) == set()
    assert {'posts', 'comments', 'tags', 'post_tags', 'notes'} <= tables(url)

    command.upgrade(config, 'heads')

    command.check(config)
    assert schema(url) == created_schema
    assert heads(config, url) == {'host_0001', HEAD}
    assert side.count('outbound_messages') == 0
    side.engine.dispose()


def test_a_database_made_by_create_all_of_0_2_0_is_stamped_not_upgraded(databases, tmp_path):
    url = databases.url('migrate_stamp')
    config = host(tmp_path, url)
    command.upgrade(config, 'host@head')
    engine = create_engine(url)
    models.metadata.create_all(engine)
    engine.dispose()

    with pytest.raises(CommandError, match='alembic stamp communicator@head') as refused:
        command.upgrade(config, 'heads')
    # The other way to get here (a test teardown that keeps our tables) is
    # told to drop them, not to stamp stale rows as current.
    assert 'pyramid_communicator.models.metadata.drop_all(engine)' in str(refused.value)

    command.stamp(config, 'communicator@head')
    command.check(config)
    assert heads(config, url) == {'host_0001', HEAD}


def test_a_0_1_0_database_is_taken_over_and_its_pending_messages_travel(
        databases, tmp_path, make_side, serve, make_central, created_schema):
    """A central app that ran 0.1.0 (our tables made by create_all, its own
    by its own revision) with a message in every queue: the upgrade keeps
    them all, gives the records it published their self rows, and the next
    exchange delivers and applies everything, including the facade's
    update of a record central published under 0.1.0 (refused without its
    self row)."""
    url = databases.url('migrate_takeover')
    config = host(tmp_path, url)
    command.upgrade(config, 'host@head')
    central_side = Side('central', url, create_engine(url))
    V010.create_all(central_side.engine)
    # Messages written by 0.1.0 carry no version: while they travel, both
    # sides take them as a gem peer's (docs/upgrading.rst).
    unversioned = {'communicator.gem_peer': 'true'}
    facade = serve(make_side('facade'), **unversioned)
    long_ago = datetime.datetime(2026, 1, 5, 12, 0)

    # Central's history under 0.1.0: post 1 published and delivered (the
    # facade holds it as its post 7), a post published before it had an
    # id, post 2 published and still waiting.
    with central_side.engine.begin() as conn:
        conn.execute(Post.__table__.insert(), [{'id': 1, 'title': 'Delivered long ago'},
                                               {'id': 2, 'title': 'Waiting to go'}])
        conn.execute(OUT_010.insert(), [
            {'body': post_body('Delivered long ago'), 'origin': None, 'original_id': 1,
             'created_at': long_ago, 'delivered_at': long_ago},
            {'body': post_body('Sent without id'), 'origin': None, 'original_id': None,
             'created_at': long_ago, 'delivered_at': long_ago},
            {'body': post_body('Waiting to go'), 'origin': None, 'original_id': 2,
             'created_at': long_ago, 'delivered_at': None}])
        conn.execute(STATE_010.insert().values(key='last_push', value=long_ago.isoformat(),
                                               updated_at=long_ago))
    with facade.side.engine.begin() as conn:
        conn.execute(Post.__table__.insert(), [{'id': 7, 'title': 'Delivered long ago'},
                                               {'id': 8, 'title': 'Sent without id'}])
        conn.execute(models.communicator_mappings.insert().values(
            name='post', origin='central', original_id=1, local_id=7, life=0))
    # The facade's comment was pulled by central and stored, not applied yet.
    comment_id = comment(facade, body='Said on the facade')
    [sent] = facade.side.rows('outbound_messages')
    with central_side.engine.begin() as conn:
        conn.execute(IN_010.insert().values(
            sender='facade', remote_id=sent['id'], body=sent['body'], origin='facade',
            original_id=comment_id, refs=sent['refs'], created_at=long_ago, attempts=0))
    with facade.side.engine.begin() as conn:
        conn.execute(text('UPDATE outbound_messages SET delivered_at = created_at'))
    # Meanwhile the facade edits central's post 1.
    facade.update_post(7, title='Edited on the facade')

    command.upgrade(config, 'heads')

    command.check(config)
    assert schema(url) == created_schema
    assert heads(config, url) == {'host_0001', HEAD}
    assert [(r['original_id'], r['delivered_at'] is None, r['format'], r['version'])
            for r in central_side.rows('outbound_messages')] == [
        (1, False, 1, None), (None, False, 1, None), (2, True, 1, None)]
    [stored] = central_side.rows('inbound_messages')
    assert (stored['sender'], stored['body'], stored['processed_at'], stored['format'],
            stored['refused_at']) == ('facade', sent['body'], None, 1, None)
    assert [(r['name'], r['origin'], r['original_id'], r['local_id'], r['version'], r['life'])
            for r in central_side.rows('communicator_mappings')] == [
        ('post', '', 1, 1, None, 0), ('post', '', 2, 2, None, 0)]
    assert [r['key'] for r in central_side.rows('communicator_state', 'updated_at')] == [
        'last_push']

    central = make_central(central_side, facade.url, **unversioned)
    assert summary(central.sync()) == dict(pushed=1, pulled=1, applied=2, failed=0,
                                           waiting=0)

    assert {p['id']: p['title'] for p in posts_by_title(central_side).values()} == {
        1: 'Edited on the facade', 2: 'Waiting to go'}
    assert [c['body'] for c in central_side.rows('comments')] == ['Said on the facade']
    assert central_side.count('inbound_messages', 'processed_at IS NULL') == 0
    assert central_side.count('inbound_messages', 'refused_at IS NOT NULL') == 0
    assert central_side.count('outbound_messages', 'delivered_at IS NULL') == 0
    assert sorted(posts_by_title(facade.side)) == [
        'Edited on the facade', 'Sent without id', 'Waiting to go']
    central_side.engine.dispose()



def autogenerate(config: Config) -> str:
    """The host revision autogenerate writes for its new table (removed)."""
    script = command.revision(config, message='tags', autogenerate=True, head='host@head',
                              rev_id='host_0002')
    path = Path(script.path)
    written = path.read_text()
    path.unlink()
    assert "op.create_table('tags'" in written
    return written


def test_host_autogenerate_writes_only_the_hosts_changes(databases, tmp_path):
    """A host revision autogenerated for a new host table holds that table
    and nothing of ours when the host's target_metadata lists ours, or
    when it passes our include_object; with neither (the cookiecutter's
    env.py as it comes) it would drop our tables."""
    url = databases.url('migrate_autogenerate')
    config = host(tmp_path, url)
    command.upgrade(config, 'heads')
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text('DROP TABLE post_tags'))  # host models not migrated yet
        conn.execute(text('DROP TABLE tags'))
    engine.dispose()

    assert not any(table in autogenerate(config) for table in models.metadata.tables)

    config.set_main_option('host_metadata_only', 'true')
    assert "op.drop_table('outbound_messages')" in autogenerate(config)

    config.set_main_option('ignore_communicator_tables', 'true')
    assert not any(table in autogenerate(config) for table in models.metadata.tables)


def test_downgrade_of_0003_keeps_given_up_messages_from_going(databases, tmp_path,
                                                              created_schema):
    """Without the set-aside columns a given-up message would be pending
    again: it counts as delivered instead; a set-aside one is pending."""
    url = databases.url('migrate_0003')
    config = host(tmp_path, url)
    command.upgrade(config, 'heads')
    side = Side('central', url, create_engine(url))
    now = datetime.datetime(2026, 12, 7, 6, 0)
    with side.engine.begin() as conn:
        conn.execute(models.outbound_messages.insert(), [
            {'body': post_body('given up'), 'original_id': 1, 'created_at': now,
             'failed_at': now, 'attempts': 1, 'last_error': 'too large',
             'given_up_at': now, 'given_up_by': 'alice', 'given_up_reason': 'huge'},
            {'body': post_body('set aside'), 'original_id': 2, 'created_at': now,
             'failed_at': now, 'attempts': 1, 'last_error': 'too large',
             'given_up_at': None, 'given_up_by': None, 'given_up_reason': None}])

    command.downgrade(config, 'communicator_0002')

    assert heads(config, url) == {'host_0001', 'communicator_0002'}
    assert [(r['original_id'], r['delivered_at'] is not None)
            for r in side.rows('outbound_messages')] == [(1, True), (2, False)]
    assert 'failed_at' not in side.rows('outbound_messages')[0]

    command.upgrade(config, 'heads')
    command.check(config)
    assert schema(url) == created_schema
    side.engine.dispose()


# -- a new app from the Pyramid cookiecutter -----------------------------------------

def test_the_first_revision_of_a_new_app_goes_to_its_own_directory_and_branch(
        databases, tmp_path):
    """The cookiecutter's app has no revision yet: ``--head base`` starts
    its own branch in its own directory; without them Alembic would write
    it into our package, after our head."""
    url = databases.url('migrate_first')
    config = host(tmp_path, url)
    versions = tmp_path / 'host' / 'alembic' / 'versions'
    (versions / 'host_0001_demo_tables.py').unlink()  # a new app: none of its own yet
    command.upgrade(config, 'heads')  # autogenerate wants the database at all heads

    command.revision(config, message='init', autogenerate=True, head='base',
                     branch_label='myapp', version_path=str(versions))

    [written] = versions.glob('*.py')
    script = written.read_text()
    assert re.search(r"^down_revision: .* = None$", script, re.M), script
    assert re.search(r"^branch_labels: .* = \('myapp',\)$", script, re.M), script
    assert "op.create_table('posts'" in script
    assert 'communicator' not in script  # our tables are ours to create
    command.upgrade(config, 'heads')
    assert len(heads(config, url)) == 2
    command.check(config)



def cookiecutter_session(config: Config, url: str, target: str,
                         drop_ours: bool) -> None:
    """What the cookiecutter's ``dbengine`` fixture does around a test
    session (drop, purge the stamp, upgrade; then drop and purge), with
    our ``drop_all`` added where ``drop_ours``."""
    from pyramid_communicator.demo.models import Base
    engine = create_engine(url)

    def clear() -> None:
        Base.metadata.drop_all(bind=engine)
        if drop_ours:
            models.metadata.drop_all(bind=engine)
        command.stamp(config, None, purge=True)
    try:
        clear()
        command.upgrade(config, target)
        clear()
    finally:
        engine.dispose()


def test_the_cookiecutter_conftest_needs_heads_and_our_tables_dropped(databases, tmp_path):
    """What a new user meets, in order, and the conftest that works
    (docs/testing.rst)."""
    url = databases.url('migrate_conftest')
    config = host(tmp_path, url)

    with pytest.raises(CommandError, match="Multiple head revisions are present for "
                                           "given argument 'head'"):
        cookiecutter_session(config, url, 'head', drop_ours=False)

    cookiecutter_session(config, url, 'heads', drop_ours=False)  # a first run passes
    with pytest.raises(CommandError) as refused:  # the next does not
        cookiecutter_session(config, url, 'heads', drop_ours=False)
    assert 'metadata.drop_all(engine)' in str(refused.value)

    for _ in range(2):  # the documented teardown: any number of runs
        cookiecutter_session(config, url, 'heads', drop_ours=True)
