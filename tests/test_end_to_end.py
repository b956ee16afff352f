"""End to end: two real apps, each with its own database; the facade
served by waitress on loopback, the central app's ``pcommunicate`` run as
a subprocess, exactly as cron would run it.

Records are made on central straight in its database (as the central app
would, with ``publish`` in its own transaction) and on the facade through
the demo app's HTTP views.  What each side holds afterwards is read from
its database.
"""
from __future__ import annotations

import datetime
import re

import pytest
import requests
from conftest import Central, Server, Side
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from pyramid_communicator import publish
from pyramid_communicator.demo.models import Comment, Post
from pyramid_communicator.models import OutboundMessage

SUMMARY = re.compile(r'^pushed=(\d+) pulled=(\d+) applied=(\d+) failed=(\d+) '
                     r'waiting=(\d+) seconds=\d+\.\d\d$')


def summary(stdout: str) -> dict[str, int]:
    """The counts of pcommunicate's one-line summary, so a test can say
    what travelled without reading both databases for it."""
    match = SUMMARY.match(stdout.strip())
    assert match, f'no summary line in {stdout!r}'
    return dict(zip(('pushed', 'pulled', 'applied', 'failed', 'waiting'),
                    map(int, match.groups()), strict=True))


def central_post(central: Central, publish_it: bool = True, **fields) -> int:
    """Create a post on central the way the central app itself would:
    the change and its outbound message in one transaction."""
    with central.side.session() as session:
        post = Post(**fields)
        session.add(post)
        session.flush()
        if publish_it:
            publish(session, post)
        return post.id


def execute(side: Side, sql: str, **params) -> int:
    """Change a side's database behind the apps' backs (an operator, a
    fault); returns the rowcount."""
    with side.engine.begin() as conn:
        return conn.execute(text(sql), params).rowcount


def posts_by_title(side: Side) -> dict[str, dict]:
    """Posts as the app sees them: through the ORM, so that values have
    their Python types on every backend (SQLite returns text otherwise)."""
    with side.session() as session:
        return {post.title: {column.key: getattr(post, column.key)
                             for column in Post.__table__.columns}
                for post in session.scalars(select(Post).order_by(Post.id))}


def comment(facade: Server, **fields) -> int:
    """A comment made through the facade's demo view: it is published by
    autopublish when the view flushes, not by an explicit publish()."""
    response = requests.post(facade.url + '/comments', json=fields, timeout=10)
    response.raise_for_status()
    return response.json()['id']


MESSAGE_TABLES = ('posts', 'comments', 'outbound_messages', 'inbound_messages',
                  'communicator_mappings')


# -- what the gem's own test suite covered ---------------------------------

def test_missing_credentials_fail_clearly(make_side, make_central):
    central = make_central(make_side('central'), 'http://127.0.0.1:9',
                           **{'communicator.username': None})
    result = central.pcommunicate()
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        'pcommunicate: communicator.username is required but not set']
    assert result.stdout == ''


def test_empty_push_and_pull_change_nothing(pair):
    central, facade = pair
    assert summary(central.sync()) == dict(pushed=0, pulled=0, applied=0, failed=0,
                                           waiting=0)
    for side in (central.side, facade.side):
        for table in MESSAGE_TABLES:
            assert side.count(table) == 0, (side.name, table)


def test_central_post_arrives_once_and_takes_the_facades_update(pair):
    """The gem's story for a record made on central, in one exchange after
    another: it arrives; sending it again changes nothing; the facade's
    edit comes back and updates it."""
    central, facade = pair
    leap = datetime.datetime(2024, 2, 29, 23, 59, 58)
    body = 'Grüße ☃ — "quoted"\nsecond line'
    post_id = central_post(central, title='Hello', body=body, published_on=leap)
    with central.side.session() as session:  # autopublished
        session.add(Comment(body='a comment too'))

    assert summary(central.sync()) == dict(pushed=2, pulled=0, applied=0, failed=0,
                                           waiting=0)
    [post] = posts_by_title(facade.side).values()
    assert (post['title'], post['body'], post['published_on']) == ('Hello', body, leap)
    assert [c['body'] for c in facade.side.rows('comments')] == ['a comment too']
    assert [(m['origin'], m['original_id'], m['local_id'])
            for m in facade.side.rows('communicator_mappings')
            if m['name'] == 'post'] == [('central', post_id, post['id'])]
    outbound = central.side.rows('outbound_messages')
    assert len(outbound) == 2 and all(m['delivered_at'] is not None for m in outbound)
    # Applying received records publishes nothing back (no echo), not even
    # the autopublished comment.
    assert facade.side.count('outbound_messages') == 0
    assert facade.side.count('inbound_messages', 'processed_at IS NOT NULL') == 2

    # Pushing the same messages again changes nothing.
    assert execute(central.side, 'UPDATE outbound_messages SET delivered_at = NULL') == 2
    assert summary(central.sync())['pushed'] == 2
    assert len(posts_by_title(facade.side)) == 1
    assert facade.side.count('comments') == 1
    assert facade.side.count('inbound_messages') == 2
    assert central.side.count('outbound_messages', 'delivered_at IS NULL') == 0

    # The facade edits the post and publishes; a pull updates central's post.
    facade.update_post(post['id'], title='Final', body='edited on the facade')
    assert summary(central.sync()) == dict(pushed=0, pulled=1, applied=1, failed=0,
                                           waiting=0)
    [updated] = posts_by_title(central.side).values()
    assert (updated['id'], updated['title'], updated['body'], updated['published_on']) == (
        post_id, 'Final', 'edited on the facade', leap)
    assert central.side.count('inbound_messages') == 1
    assert central.side.count('communicator_mappings', "origin <> ''") == 0  # it is central's own
    assert central.side.count('outbound_messages') == 2  # nothing echoed back


def test_facade_post_arrives_at_central(pair):
    central, facade = pair
    new_year = datetime.datetime(2023, 12, 31, 0, 0, 1)
    body = 'émoji 🎉 and \\ backslash'
    created = facade.create_post(title='Online', body=body,
                                 published_on=new_year.isoformat())

    assert summary(central.sync()) == dict(pushed=0, pulled=1, applied=1, failed=0,
                                           waiting=0)

    [post] = posts_by_title(central.side).values()
    assert (post['title'], post['body'], post['published_on']) == ('Online', body, new_year)
    [mapping] = [m for m in central.side.rows('communicator_mappings') if m['origin']]
    assert (mapping['origin'], mapping['original_id'], mapping['local_id']) == (
        'facade', created['id'], post['id'])
    assert facade.side.count('outbound_messages', 'delivered_at IS NULL') == 0
    assert central.side.count('outbound_messages') == 0


def test_excluded_title_stays_null_on_the_other_side(pair):
    central, facade = pair
    with central.side.session() as session:
        session.add(Comment(title='central only', body='from central'))
    comment(facade, title='facade only', body='from the facade')

    assert summary(central.sync())['applied'] == 1

    at_facade = {c['body']: c['title'] for c in facade.side.rows('comments')}
    at_central = {c['body']: c['title'] for c in central.side.rows('comments')}
    assert at_facade == {'from the facade': 'facade only', 'from central': None}
    assert at_central == {'from central': 'central only', 'from the facade': None}


def test_unsaved_published_post_gets_the_facades_own_id(pair):
    central, facade = pair
    existing = [facade.create_post(title=f'local {n}', publish=False)['id']
                for n in range(2)]
    with central.side.session() as session:
        publish(session, Post(title='Unsaved', body='never flushed'))

    central.sync()

    assert central.side.count('posts') == 0
    arrived = posts_by_title(facade.side)['Unsaved']
    assert arrived['body'] == 'never flushed'
    assert arrived['id'] > max(existing)
    assert facade.side.count('communicator_mappings', "origin <> ''") == 0


# -- beyond the gem ----------------------------------------------------------

def _burn_outbound_id(side: Side) -> None:
    """A transaction that inserts an outbound message and rolls back: on
    PostgreSQL and MariaDB the id is consumed and never committed."""
    session = Session(bind=side.engine)
    try:
        session.add(OutboundMessage(body='{"post":{"title":"rolled back"}}'))
        session.flush()
    finally:
        session.rollback()
        session.close()


def _drop_message(side: Side, title: str) -> None:
    """Delete the outbound message of one post, leaving a gap between
    its neighbours' ids (on every backend, SQLite included)."""
    [message_id] = [m['id'] for m in side.rows('outbound_messages')
                    if f'"title":"{title}"' in m['body']]
    execute(side, 'DELETE FROM outbound_messages WHERE id = :id', id=message_id)


def test_id_gaps_do_not_stall_sync(pair):
    central, facade = pair
    central_post(central, title='central before gap')
    _burn_outbound_id(central.side)
    central_post(central, title='central dropped')
    central_post(central, title='central after gap')
    _drop_message(central.side, 'central dropped')

    facade.create_post(title='facade before gap')
    _burn_outbound_id(facade.side)
    facade.create_post(title='facade dropped')
    facade.create_post(title='facade after gap')
    _drop_message(facade.side, 'facade dropped')

    for side in (central.side, facade.side):
        ids = [m['id'] for m in side.rows('outbound_messages')]
        assert ids[-1] - ids[0] > len(ids) - 1, f'no gap in {side.name} ids {ids}'

    central.sync()
    assert set(posts_by_title(facade.side)) == {
        'central before gap', 'central after gap', 'facade before gap',
        'facade dropped', 'facade after gap'}
    assert set(posts_by_title(central.side)) == {
        'central before gap', 'central dropped', 'central after gap',
        'facade before gap', 'facade after gap'}

    # The gem stalled on the *next* exchange after a gap; ours goes on, also
    # past the widest gap: every delivered message pruned, the highest
    # ids included (whose reuse the peer would take for a duplicate).
    for side in (central.side, facade.side):
        assert execute(side, 'DELETE FROM outbound_messages '
                             'WHERE delivered_at IS NOT NULL') == 2
    central_post(central, title='central next')
    facade.create_post(title='facade next')
    assert summary(central.sync()) == dict(pushed=1, pulled=1, applied=1, failed=0,
                                           waiting=0)
    assert 'central next' in posts_by_title(facade.side)
    assert 'facade next' in posts_by_title(central.side)


@pytest.mark.slow
def test_failing_message_at_central_is_kept_retried_and_blocks_no_one(pair):
    central, facade = pair
    central_post(central, publish_it=False, title='Central own', slug='dup')
    conflicting = facade.create_post(title='Facade conflicting', slug='dup')
    facade.create_post(title='Facade fine', slug='fine')

    assert summary(central.sync()) == dict(pushed=0, pulled=2, applied=1, failed=1,
                                           waiting=0)
    assert 'Facade fine' in posts_by_title(central.side)
    [failed] = [m for m in central.side.rows('inbound_messages') if not m['processed_at']]
    assert failed['processed_at'] is None and failed['failed_at'] is not None
    assert failed['attempts'] == 1
    assert 'IntegrityError' in failed['last_error']
    status = central.sync('--status')
    # retry_delay 0 in the tests: due again at once
    assert re.search(rf'^failed #{failed["id"]} \(from facade #\d+, 1 attempts, '
                     r'next attempt due now\): '
                     r'IntegrityError', status, re.M), status

    # Later records arrive; a later change of the failing record waits.
    facade.create_post(title='Facade later', slug='later')
    facade.update_post(conflicting['id'], body='edited while stuck')
    assert summary(central.sync()) == dict(pushed=0, pulled=2, applied=1, failed=1,
                                           waiting=1)
    assert 'Facade later' in posts_by_title(central.side)
    assert central.side.count('inbound_messages',
                              f'id = {failed["id"]} AND attempts = 2') == 1

    execute(central.side, "UPDATE posts SET slug = 'dup-central' WHERE slug = 'dup'")
    assert summary(central.sync()) == dict(pushed=0, pulled=0, applied=2, failed=0,
                                           waiting=0)
    post = posts_by_title(central.side)['Facade conflicting']
    assert (post['slug'], post['body']) == ('dup', 'edited while stuck')
    assert central.side.count('inbound_messages', 'processed_at IS NULL') == 0


@pytest.mark.slow
def test_failing_message_at_facade_is_retried_when_central_next_talks(pair):
    central, facade = pair
    own = facade.create_post(title='Facade own', slug='taken', publish=False)
    central_post(central, title='Central conflicting', slug='taken')

    central.sync()  # the facade stores it, fails to apply it, keeps it
    [failed] = facade.side.rows('inbound_messages')
    assert failed['processed_at'] is None and failed['attempts'] >= 1
    assert 'IntegrityError' in failed['last_error']

    central_post(central, title='Central later', slug='later')
    central.sync()
    assert 'Central later' in posts_by_title(facade.side)
    assert facade.side.count('inbound_messages', f'id = {failed["id"]} AND '
                             f'processed_at IS NULL AND attempts > {failed["attempts"]}') == 1

    facade.update_post(own['id'], slug='taken-by-facade', publish=False)
    assert summary(central.sync())['pushed'] == 0  # an empty exchange suffices
    assert posts_by_title(facade.side)['Central conflicting']['slug'] == 'taken'
    assert facade.side.count('inbound_messages', 'processed_at IS NULL') == 0


def test_lost_acknowledgements_do_not_duplicate(pair):
    central, facade = pair
    for n in range(2):
        central_post(central, title=f'central {n}')
        facade.create_post(title=f'facade {n}')
    with central.side.session() as session:
        session.add(Comment(body='central comment'))
    central.sync()

    def snapshot() -> dict:
        return {(side.name, table): side.count(table)
                for side in (central.side, facade.side) for table in MESSAGE_TABLES}
    before = snapshot()
    # As if the 202 of the push and the acknowledgement of the pull were lost.
    assert execute(central.side, 'UPDATE outbound_messages SET delivered_at = NULL') == 3
    assert execute(facade.side, 'UPDATE outbound_messages SET delivered_at = NULL') == 2

    assert summary(central.sync()) == dict(pushed=3, pulled=2, applied=0, failed=0,
                                           waiting=0)
    assert snapshot() == before
    for side in (central.side, facade.side):
        assert side.count('outbound_messages', 'delivered_at IS NULL') == 0
        titles = [p['title'] for p in side.rows('posts')]
        assert sorted(titles) == ['central 0', 'central 1', 'facade 0', 'facade 1']


def test_push_and_pull_options_go_one_way_only(pair):
    central, facade = pair
    central_post(central, title='from central')
    facade.create_post(title='from facade')

    pushed = summary(central.sync('--push'))
    assert (pushed['pushed'], pushed['pulled']) == (1, 0)
    assert set(posts_by_title(facade.side)) == {'from central', 'from facade'}
    assert set(posts_by_title(central.side)) == {'from central'}
    assert central.side.count('inbound_messages') == 0
    assert facade.side.count('outbound_messages', 'delivered_at IS NULL') == 1

    central_post(central, title='central again')
    pulled = summary(central.sync('--pull'))
    assert (pulled['pushed'], pulled['pulled'], pulled['applied']) == (0, 1, 1)
    assert 'from facade' in posts_by_title(central.side)
    assert 'central again' not in posts_by_title(facade.side)
    assert central.side.count('outbound_messages', 'delivered_at IS NULL') == 1
