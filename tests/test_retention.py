"""Bounded history: ``pcommunicate --purge`` and the hourly purge of
normal runs delete what is done with, keep what is not, and never let a
purged message in again."""
from __future__ import annotations

import datetime
import json

import pytest
import transaction
from conftest import Side
from sqlalchemy import text
from test_end_to_end import central_post, execute, summary

from pyramid_communicator import queues, retention, wire
from pyramid_communicator.demo.models import Comment
from pyramid_communicator.status import give_up, queue_status
from pyramid_communicator.sync import make_session

OLD = (datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
       - datetime.timedelta(days=10))


def age(side: Side) -> None:
    """Make every message and conflict record of a side ten days old."""
    with side.engine.begin() as conn:
        for sql in ('UPDATE outbound_messages SET created_at = :t, delivered_at = :t '
                    'WHERE delivered_at IS NOT NULL',
                    'UPDATE inbound_messages SET created_at = :t, processed_at = :t '
                    'WHERE processed_at IS NOT NULL',
                    'UPDATE inbound_messages SET created_at = :t, failed_at = :t '
                    'WHERE processed_at IS NULL',
                    'UPDATE communicator_conflicts SET created_at = :t',
                    'DELETE FROM communicator_state'):
            conn.execute(text(sql), {'t': OLD})


def test_purge_deletes_what_is_done_and_keeps_what_is_not(pair, make_central):
    central, facade = pair
    central_post(central, title='one')
    central_post(central, title='two')
    facade.create_post(title='from the facade')
    facade.create_post(title='taken', slug='taken')
    central_post(central, title='central has it', slug='taken')  # fails on both sides
    with central.side.session() as session:
        session.add(Comment(body='pending, never pushed'))
    summary(central.sync('--pull'))
    age(central.side)
    pending = central.side.count('outbound_messages', 'delivered_at IS NULL')
    assert pending == 4

    result = central.pcommunicate('--purge')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ('purged outbound=0 inbound=1 conflicts=0 '
                                     'refused=0 given_up=0 waiting_upgrade=0 '
                                     'tombstones=0 natural_tombstones=0')
    [kept] = central.side.rows('inbound_messages')  # failed: kept
    assert kept['processed_at'] is None and 'IntegrityError' in kept['last_error']
    assert central.side.count('outbound_messages') == pending  # undelivered: kept

    summary(central.sync())  # delivers; central's 'taken' post fails at the facade
    age(facade.side)
    facade_ini = make_central(facade.side, None)  # the facade's ini: no base_uri
    result = facade_ini.pcommunicate('--purge', '--older-than', '5')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ('purged outbound=2 inbound=3 conflicts=0 '
                                     'refused=0 given_up=0 waiting_upgrade=0 '
                                     'tombstones=0 natural_tombstones=0')
    [kept] = facade.side.rows('inbound_messages')  # the failed one stays
    assert kept['processed_at'] is None and 'IntegrityError' in kept['last_error']


@pytest.mark.slow
def test_a_purged_message_sent_again_is_not_applied_again(pair):
    central, facade = pair
    created = facade.create_post(title='original')
    summary(central.sync())
    age(central.side)
    assert central.pcommunicate('--purge').returncode == 0
    assert central.side.count('inbound_messages') == 0
    with central.side.engine.begin() as conn:  # an operator edits central's copy
        conn.execute(text("UPDATE posts SET title = 'edited on central'"))

    # The facade serves the same message again (a lost acknowledgement, a
    # proxy replaying): it is neither stored nor applied a second time.
    assert execute(facade.side, 'UPDATE outbound_messages SET delivered_at = NULL') == 1
    assert summary(central.sync())['pulled'] == 1
    assert central.side.count('inbound_messages') == 0
    assert [r['title'] for r in central.side.rows('posts')] == ['edited on central']
    assert created['title'] == 'original'


@pytest.mark.slow
def test_normal_runs_purge_by_themselves_at_most_hourly(pair):
    central, facade = pair
    central_post(central, title='one')
    summary(central.sync())
    age(central.side)
    summary(central.sync())  # no purge recorded yet: purges now
    assert central.side.count('outbound_messages') == 0
    assert [r for r in central.side.rows('communicator_state', order_by='updated_at')
            if r['key'] == 'last_purge_at']

    central_post(central, title='two')
    summary(central.sync())
    with central.side.engine.begin() as conn:  # aged again, but purged a moment ago
        conn.execute(text('UPDATE outbound_messages SET delivered_at = :t'), {'t': OLD})
    summary(central.sync())
    assert central.side.count('outbound_messages') == 1


@pytest.mark.slow
def test_retention_days_zero_keeps_everything(make_side, serve, make_central):
    facade = serve(make_side('facade'))
    central = make_central(make_side('central'), facade.url,
                           **{'communicator.retention_days': '0'})
    central_post(central, title='kept')
    summary(central.sync())
    age(central.side)
    summary(central.sync())
    assert central.side.count('outbound_messages') == 1


# -- messages never applied: refused, given up, waiting for an upgrade ----------

def arrivals(side: Side, sender: str, first: int, last: int) -> None:
    """Store ``sender``'s messages ``first``..``last`` (ids) as they arrive,
    each of one kind by its id modulo 4: refused on arrival (malformed),
    given up (failing, then given up by an operator), waiting for an
    upgrade (a newer format), failing and still retried."""
    items = []
    for number in range(first, last + 1):
        kind = number % 4
        body = json.dumps({'post': {'title': '' if kind in (1, 3) else f'Post {number}'}})
        item = {'id': number, 'body': body, 'origin': 'facade', 'original_id': number}
        if kind == 0:
            item['version'] = 'malformed'
        if kind == 2:
            item['format'] = wire.FORMAT_VERSION + 1
        items.append(item)
    messages = wire.parse_messages(json.dumps(items))
    with side.session() as session:
        queues.store_inbound(session, sender, messages)
        for number in range(first, last + 1):  # as if an apply had failed
            session.execute(text('UPDATE inbound_messages SET failed_at = :t, '
                                 "last_error = 'ValueError' WHERE remote_id = :n "
                                 'AND refused_at IS NULL AND format = 1 AND sender = :s'),
                            {'t': _now(), 'n': number, 's': sender})
        given = [row.id for row in session.execute(text(
            'SELECT id FROM inbound_messages WHERE sender = :s AND remote_id % 4 = 1 '
            'AND remote_id BETWEEN :a AND :b'), {'s': sender, 'a': first, 'b': last})]
        give_up(session, given, 'operator', 'tested')


def _now():
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def backdate(side: Side, days: float) -> None:
    when = _now() - datetime.timedelta(days=days)
    with side.engine.begin() as conn:
        conn.execute(text('UPDATE inbound_messages SET created_at = :t, failed_at = :t, '
                          'refused_at = CASE WHEN refused_at IS NULL THEN NULL ELSE :t END, '
                          'given_up_at = CASE WHEN given_up_at IS NULL THEN NULL ELSE :t END'),
                     {'t': when})


def purge(side: Side, days: float) -> retention.PurgeResult:
    tm = transaction.TransactionManager(explicit=True)
    session = make_session(side.engine, tm)
    try:
        return retention.purge(session, tm, days)
    finally:
        session.close()


def kinds(side: Side) -> dict[int, str]:
    kind = {}
    for row in side.rows('inbound_messages'):
        if row['refused_at'] is not None:
            kind[row['remote_id']] = 'refused'
        elif row['given_up_at'] is not None:
            kind[row['remote_id']] = 'given up'
        elif row['format'] > wire.FORMAT_VERSION:
            kind[row['remote_id']] = 'waiting'
        else:
            kind[row['remote_id']] = 'failed'
    return kind


def test_purge_deletes_refused_given_up_and_waiting_messages_past_retention(make_side):
    central = make_side('central')
    arrivals(central, 'facade', 1, 8)
    backdate(central, 10)
    arrivals(central, 'facade', 9, 12)  # newer: kept
    assert kinds(central) == {n: ['refused', 'given up', 'waiting', 'failed'][n % 4]
                              for n in range(1, 13)}
    with central.session() as session:
        before = queue_status(session, 'central')['inbound']
    assert (before['refused'], before['given_up'], before['waiting_upgrade']) == (3, 3, 3)

    result = purge(central, 7)
    assert (result.refused, result.given_up, result.waiting_upgrade) == (2, 2, 2)
    assert result.inbound == 0
    # Failed and still retried: kept, however old; the newer ones: kept.
    assert kinds(central) == {3: 'failed', 7: 'failed', 9: 'given up', 10: 'waiting',
                              11: 'failed', 12: 'refused'}
    with central.session() as session:
        after = queue_status(session, 'central')['inbound']
        assert queues.purged_watermark(session, 'facade') == 8
    assert (after['refused'], after['given_up'], after['waiting_upgrade']) == (1, 1, 1)


def test_a_purged_refused_or_waiting_message_is_not_stored_again(make_side):
    central = make_side('central')
    arrivals(central, 'facade', 1, 4)
    backdate(central, 10)
    assert purge(central, 7).refused == 1
    assert central.count('inbound_messages') == 1  # 3: failed, kept
    arrivals(central, 'facade', 1, 6)  # the facade sends them all again
    assert sorted(kinds(central)) == [3, 5, 6]
    assert central.count('posts') == 0
