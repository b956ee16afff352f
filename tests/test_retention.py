"""Bounded history: ``pcommunicate --purge`` and the hourly purge of
normal runs delete what is done with, keep what is not, and never let a
purged message in again."""
from __future__ import annotations

import datetime

import pytest
from conftest import Side
from sqlalchemy import text
from test_end_to_end import central_post, execute, summary

from pyramid_communicator.demo.models import Comment

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
    assert result.stdout.strip() == 'purged outbound=0 inbound=1 conflicts=0'
    [kept] = central.side.rows('inbound_messages')  # failed: kept
    assert kept['processed_at'] is None and 'IntegrityError' in kept['last_error']
    assert central.side.count('outbound_messages') == pending  # undelivered: kept

    summary(central.sync())  # delivers; central's 'taken' post fails at the facade
    age(facade.side)
    facade_ini = make_central(facade.side, None)  # the facade's ini: no base_uri
    result = facade_ini.pcommunicate('--purge', '--older-than', '5')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'purged outbound=2 inbound=3 conflicts=0'
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
