"""Queues larger than a batch, and bodies larger than the peer accepts,
still cross completely: in several requests, never all at once."""
from __future__ import annotations

import json
import re

import pytest
from conftest import versioned
from test_end_to_end import summary
from test_records import deliver

from pyramid_communicator import publish
from pyramid_communicator.demo.models import Post
from pyramid_communicator.settings import parse_settings
from pyramid_communicator.sync import apply_inbound
from pyramid_communicator.wire import parse_messages


def publish_posts(side, count: int, body: str = 'x') -> None:
    with side.session() as session:
        for number in range(count):
            post = Post(title=f'post {number}', body=body)
            session.add(post)
            session.flush()
            publish(session, post)


def test_queues_larger_than_a_batch_cross_in_several_batches(make_side, serve, make_central):
    facade = serve(make_side('facade'), **{'communicator.batch_size': 7})
    central = make_central(make_side('central'), facade.url, **{'communicator.batch_size': 7})
    publish_posts(central.side, 30)
    for number in range(23):
        facade.create_post(title=f'facade post {number}')

    figures = summary(central.sync())
    assert (figures['pushed'], figures['pulled'], figures['applied']) == (30, 23, 23)
    assert facade.side.count('posts') == central.side.count('posts') == 53
    assert facade.side.count('outbound_messages', 'delivered_at IS NULL') == 0
    assert central.side.count('outbound_messages', 'delivered_at IS NULL') == 0


def test_a_push_over_the_peers_body_limit_is_split(make_side, serve, make_central):
    facade = serve(make_side('facade'), **{'communicator.max_body_bytes': 4000})
    # central does not know the facade's limit: it learns it from the 413s
    central = make_central(make_side('central'), facade.url)
    publish_posts(central.side, 12, body='y' * 900)

    assert summary(central.sync())['pushed'] == 12
    assert facade.side.count('posts') == 12
    assert facade.side.count('inbound_messages') == 12


def test_a_single_message_over_our_limit_is_set_aside_and_the_run_goes_on(
        make_side, serve, make_central):
    """Larger than central's own limit on its own: never sent, set aside
    (docs/operations.rst); the push of the rest and the pull go on."""
    facade = serve(make_side('facade'), **{'communicator.max_body_bytes': 4000})
    central = make_central(make_side('central'), facade.url,
                           **{'communicator.max_body_bytes': 4000})
    publish_posts(central.side, 1, body='z' * 5000)
    facade.create_post(title='still pulled')

    result = central.pcommunicate()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith('set_aside=1')
    assert re.search(r'set aside outbound message 1: \d{4} bytes encoded, more than '
                     r'communicator.max_body_bytes=4000', result.stderr)
    assert facade.side.count('inbound_messages') == 0
    [row] = central.side.rows('outbound_messages')
    assert (row['delivered_at'], row['attempts']) == (None, 1)
    assert row['failed_at'] is not None and 'bytes encoded' in row['last_error']
    assert [row['title'] for row in central.side.rows('posts')] == ['post 0', 'still pulled']


def test_a_message_set_aside_in_a_later_batch_leaves_the_others_delivered(
        make_side, serve, make_central):
    """The next batch is read while one is on the wire: when one message
    of it cannot go, what the peer took stays delivered, the message is
    set aside and the messages of other records after it go too."""
    facade = serve(make_side('facade'), **{'communicator.max_body_bytes': 4000})
    central = make_central(make_side('central'), facade.url,
                           **{'communicator.batch_size': 4,
                              'communicator.max_body_bytes': 4000})
    publish_posts(central.side, 8)
    publish_posts(central.side, 1, body='z' * 5000)  # the third batch, alone
    publish_posts(central.side, 2)

    figures = summary(central.sync().replace(' set_aside=1', ''))
    assert figures['pushed'] == 10
    assert facade.side.count('posts') == 10
    assert [(row['id'], row['failed_at'] is not None)
            for row in central.side.rows('outbound_messages')
            if row['delivered_at'] is None] == [(9, True)]


@pytest.mark.slow
def test_a_pull_applies_as_it_goes_and_tries_each_failure_once_per_run(
        make_side, serve, make_central):
    """A pull of several batches applies each while the next is fetched; a
    message that fails meanwhile is not tried again in the same run, and
    the run still applies the rest."""
    facade = serve(make_side('facade'), **{'communicator.batch_size': 3})
    central = make_central(make_side('central'), facade.url,
                           **{'communicator.batch_size': 3})
    with central.side.session() as session:
        session.add(Post(title='holds the slug', slug='taken'))
    facade.create_post(title='clashes', slug='taken')  # fails at central
    for number in range(7):
        facade.create_post(title=f'facade post {number}')

    figures = summary(central.sync())
    assert (figures['pulled'], figures['applied'], figures['failed']) == (8, 7, 1)
    clash = [row for row in central.side.rows('inbound_messages') if row['processed_at'] is None]
    assert len(clash) == 1 and clash[0]['attempts'] == 1
    assert 'IntegrityError' in clash[0]['last_error']
    assert central.side.count('posts') == 8

    figures = summary(central.sync())  # the next run tries it again
    assert (figures['pulled'], figures['applied'], figures['failed']) == (0, 0, 1)
    assert [row['attempts'] for row in central.side.rows('inbound_messages')
            if row['processed_at'] is None] == [2]


def test_an_apply_stops_at_run_seconds_between_pages_and_the_next_run_goes_on(
        make_side, monkeypatch):
    """A backlog of received messages is applied a page at a time; once
    ``run_seconds`` has passed, the run stops after its page, exit 0, and
    the next run applies the rest."""
    from pyramid_communicator import sync

    central = make_side('central')
    deliver(central, *parse_messages(json.dumps([
        versioned({'id': n, 'body': json.dumps({'post': {'title': f'p{n}'}}),
                   'origin': 'facade', 'original_id': n, 'format': 2}, 'facade')
        for n in range(1, 21)])), sender='facade')
    settings = parse_settings({'communicator.name': 'central', 'communicator.username': 'u',
                               'communicator.password': 'p', 'communicator.batch_size': '5',
                               'communicator.base_uri': 'http://127.0.0.1:9',
                               'communicator.run_seconds': '1'})
    clock = iter(range(0, 10_000, 10))  # every look at the clock: 10 s later
    monkeypatch.setattr(sync.time, 'monotonic', lambda: next(clock))
    communicator = sync.Communicator(settings, central.engine)
    try:
        summary = communicator.communicate(push=False, pull=False)
    finally:
        communicator.close()
    assert summary.stopped_early and summary.applied == 5
    assert central.count('inbound_messages', 'processed_at IS NULL') == 15

    monkeypatch.undo()
    assert apply_inbound(central.engine, settings).applied == 15
