"""Plain messages (issue 17): sending, handlers, order, failures, trust.

Most tests carry messages in process: the sender's outbound rows, encoded
and parsed as on the wire, stored in the receiver's inbound queue and
applied with the receiver's registry (the demo app's, with handlers added
per test).  The contact form runs end to end over real HTTP.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import pytest
import transaction
import zope.sqlalchemy
from conftest import Side, app_settings
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationConflictError
from sqlalchemy.orm import Session
from test_views import NAMED

from pyramid_communicator import message_handler, messages, publish, queues, send, wire
from pyramid_communicator.demo import main
from pyramid_communicator.demo.models import ContactRequest, Post
from pyramid_communicator.inbox import ApplyResult
from pyramid_communicator.retention import purge
from pyramid_communicator.settings import get_settings
from pyramid_communicator.status import format_status, queue_status
from pyramid_communicator.sync import apply_inbound, make_session
from pyramid_communicator.trust import Refused


class App:
    """One side: its database and the demo app's registry, with handlers
    added by the test."""

    def __init__(self, side: Side, **settings: Any) -> None:
        self.side = side
        self.router = main({}, **app_settings(side, **settings))
        self.registry = self.router.registry
        self.settings = get_settings(self.registry)
        self.calls: list[tuple[str, Any]] = []

    def handle(self, kind: str, handler: Callable | None = None, **kw: Any) -> None:
        def record(message):
            self.calls.append((message.kind, message.payload))
            if handler is not None:
                handler(message)
        config = Configurator(registry=self.registry)
        config.add_message_handler(kind, record, **kw)
        config.commit()

    def session(self):
        """A host session in a transaction of its own that knows the
        app's settings (as a handler's does)."""
        tm = transaction.TransactionManager(explicit=True)
        session = Session(bind=self.side.engine,
                          info={messages.SETTINGS_INFO: self.settings})
        zope.sqlalchemy.register(session, transaction_manager=tm)
        return tm, session

    def send(self, *sends: tuple) -> list[int]:
        tm, session = self.session()
        with tm:
            ids = [send(session, *args) for args in sends]
        session.close()
        return ids

    def apply(self, retry_now: bool = False, registry: Any = True) -> ApplyResult:
        return apply_inbound(self.side.engine, self.settings, retry_now=retry_now,
                             registry=self.registry if registry is True else registry)


def carry(source: App, target: App) -> list[wire.WireMessage]:
    """Move ``source``'s pending outbound messages into ``target``'s
    inbound queue as the wire would (encoded, parsed, stored once)."""
    tm, session = source.session()
    with tm:
        rows = queues.pending_outbound(session, 10_000)
        sent = [wire.outbound_to_wire(row, source.side.name) for row in rows]
        queues.mark_delivered(session, [m.id for m in sent])
    session.close()
    parsed = wire.parse_messages(wire.dumps(sent))
    with target.side.session() as session:
        queues.store_inbound(session, source.side.name, parsed)
    return parsed


@pytest.fixture
def apps(make_side) -> tuple[App, App]:
    return App(make_side('central')), App(make_side('facade'))


def inbound(app: App) -> list[dict]:
    return app.side.rows('inbound_messages')


# -- sending ---------------------------------------------------------------------

def test_send_checks_what_it_sends_in_the_senders_transaction(apps):
    central, _ = apps
    tm, session = central.session()
    with tm:
        with pytest.raises(TypeError, match='not JSON'):
            send(session, 'x', {'when': object()})
        with pytest.raises(TypeError, match='not JSON'):
            send(session, 'x', math.nan)
        with pytest.raises(ValueError, match='kind'):
            send(session, 'no spaces', {})
        with pytest.raises(ValueError, match='kind'):
            send(session, 'k' * 65, {})
        with pytest.raises(ValueError, match='ordering key'):
            send(session, 'x', {}, key='')
        with pytest.raises(ValueError, match='more than'):
            send(session, 'x', 'a' * (messages.MAX_PAYLOAD_BYTES + 1))
        deep: Any = 1
        for _ in range(messages.MAX_DEPTH + 1):
            deep = [deep]
        with pytest.raises(ValueError, match='levels deep'):
            send(session, 'x', deep)
        with pytest.raises(ValueError, match='lone surrogate'):
            send(session, 'x', 'a\ud800b')
        send(session, 'x', 'a\x00b')  # JSON escapes it: stored as \u0000
        assert send(session, 'fine.kind-1', {'ok': [1, 2.5, None, 'ü']}, key='k') > 0
    session.close()
    with pytest.raises(TypeError, match='needs the request'):
        send(Session(bind=central.side.engine), 'x', {})
    assert central.side.count('outbound_messages') == 2


def test_send_takes_the_hosts_own_session_in_a_request(apps):
    """``send(request.dbsession, ...)``: a session that knows nothing of
    the add-on, in a request (or a bootstrapped script) of the app."""
    from pyramid.scripting import prepare
    central, _ = apps
    env = prepare(registry=central.registry)
    try:
        tm = transaction.TransactionManager(explicit=True)
        session = Session(bind=central.side.engine)
        zope.sqlalchemy.register(session, transaction_manager=tm)
        with tm:
            assert send(session, 'x', {'from': 'a view'}) > 0
        session.close()
    finally:
        env['closer']()
    [row] = central.side.rows('outbound_messages')
    assert json.loads(row['body'])['@message']['payload'] == {'from': 'a view'}


def test_the_cap_follows_max_body_bytes(make_side):
    small = App(make_side('central'), **{'communicator.max_body_bytes': 64 * 1024})
    assert messages.payload_limit(small.settings) == 32 * 1024 - 1024
    with pytest.raises(ValueError, match='max_body_bytes'):
        small.send(('x', 'a' * 40_000))
    small.send(('x', 'a' * 30_000))


def test_a_gem_peer_is_never_sent_a_message(make_side):
    gem = App(make_side('central'), **{'communicator.gem_peer': 'true'})
    with pytest.raises(messages.GemPeer, match='Ruby gem'):
        gem.send(('contact.submitted', {}))
    assert gem.side.count('outbound_messages') == 0


def test_an_aborted_transaction_sends_nothing(apps):
    central, _ = apps
    tm, session = central.session()
    with pytest.raises(RuntimeError), tm:
        send(session, 'x', {'n': 1})
        raise RuntimeError('the request fails')
    session.close()
    assert central.side.count('outbound_messages') == 0


def test_send_takes_the_request_in_a_view(webapp, make_side):
    side = make_side('facade')
    app = webapp(side)
    reply = app.post_json('/contact', {'name': 'Ann', 'email': 'ann@example.org',
                                       'text': 'Hello'}).json
    row, = side.rows('outbound_messages')
    assert row['id'] == reply['message_id'] and row['format'] == wire.MESSAGE_FORMAT
    assert json.loads(row['body'])['@message']['key'] == 'ann@example.org'


# -- handling --------------------------------------------------------------------

def test_handlers_run_in_the_order_sent_and_see_the_records_before_them(apps):
    central, facade = apps
    seen = []

    def check(message):
        titles = [p.title for p in message.session.query(Post).order_by(Post.id)]
        seen.append((message.payload['n'], titles))
    facade.handle('step', check)
    tm, session = central.session()
    with tm:
        for n in range(12):
            send(session, 'step', {'n': n})
            if n % 4 == 0:
                post = Post(title=f'before {n + 1}')
                session.add(post)
                session.flush()
                publish(session, post)
    session.close()
    carry(central, facade)
    result = facade.apply()
    assert (result.applied, result.failed) == (15, 0)
    assert [n for n, _ in seen] == list(range(12))
    assert seen[0][1] == [] and seen[1][1] == ['before 1'] and seen[5][1] == ['before 1',
                                                                             'before 5']


def test_the_message_a_handler_gets(apps):
    central, facade = apps
    got = []
    facade.handle('hello', got.append)
    remote_id, = central.send(('hello', {'a': [1, 'two']}, 'k-1'))
    carry(central, facade)
    facade.apply()
    message, = got
    assert (message.kind, message.payload, message.origin, message.id, message.key) == (
        'hello', {'a': [1, 'two']}, 'central', remote_id, 'k-1')
    assert message.sent_at is not None and message.registry is facade.registry
    assert message.session is not None and message.transaction_manager is not None


def test_what_a_handler_writes_commits_with_the_message_once(apps):
    central, facade = apps

    def write(message):
        message.session.add(ContactRequest(name='n', email='e', text='t', status='x',
                                           message_id=message.id))
    facade.handle('write', write)
    central.send(('write', {}), ('write', {}))
    carry(central, facade)
    carry(central, facade)  # nothing new; a re-send of the same ids is stored once
    assert facade.apply().applied == 2
    assert facade.apply().applied == 0
    assert facade.side.count('contact_requests') == 2


def test_a_failing_handler_fails_its_message_which_is_retried(apps):
    central, facade = apps
    broken = {'yes': True}

    def flaky(message):
        message.session.add(ContactRequest(name='n', email='e', text='t', status='x'))
        if broken['yes'] and message.payload == 'bad':
            raise ValueError('the mail server is down')
    facade.handle('flaky', flaky)
    central.send(('flaky', 'ok-1'), ('flaky', 'bad'), ('flaky', 'ok-2'))
    carry(central, facade)
    result = facade.apply()
    assert (result.applied, result.failed) == (2, 1)
    assert facade.side.count('contact_requests') == 2  # the failed one's write rolled back
    with facade.side.session() as session:
        status = queue_status(session, 'facade')
    failure, = status['failures']
    assert not failure['refused']
    assert "ValueError: the mail server is down (in the handler of 'flaky'" in failure['error']
    assert 'the mail server is down' in format_status(status)
    assert facade.apply().failed == 1  # retry_delay 0: tried again, fails again
    broken['yes'] = False
    result = facade.apply(retry_now=True)  # pcommunicate --retry
    assert (result.applied, result.failed) == (1, 0)
    assert facade.side.count('contact_requests') == 3
    # A batch is one transaction: the handlers before a failing one ran in
    # it and run again when the others are applied without it.
    assert [payload for _, payload in facade.calls] == ['ok-1', 'bad', 'ok-1', 'ok-2',
                                                        'bad', 'bad']


def test_messages_of_a_key_wait_behind_a_failed_one(apps):
    central, facade = apps
    broken = {'yes': True}

    def order(message):
        if broken['yes'] and message.payload == 'pay':
            raise RuntimeError('payment service unavailable')
    facade.handle('order', order)
    central.send(('order', 'pay', 'order-42'), ('order', 'other', 'order-7'),
                 ('order', 'ship', 'order-42'), ('order', 'unkeyed'),
                 ('order', 'close', 'order-42'))
    carry(central, facade)
    result = facade.apply()
    assert (result.applied, result.failed, result.waiting) == (2, 1, 2)
    assert [p for _, p in facade.calls] == ['pay', 'other', 'unkeyed']  # failed first
    central.send(('order', 'late', 'order-42'))
    carry(central, facade)
    result = facade.apply()  # retried first (retry_delay 0), fails; the key still waits
    assert (result.applied, result.failed, result.waiting) == (0, 1, 3)
    broken['yes'] = False
    result = facade.apply()
    assert (result.applied, result.failed, result.waiting) == (4, 0, 0)
    assert [p for _, p in facade.calls][-4:] == ['pay', 'ship', 'close', 'late']


def test_a_kind_without_a_handler_is_refused_kept_and_purged(apps):
    central, facade = apps
    facade.handle('known')
    central.send(('unknown.kind', {'x': 1}, 'k'), ('known', 1), ('unknown.kind', {}, 'k'),
                 ('known', 2))
    carry(central, facade)
    result = facade.apply()
    assert (result.applied, result.failed) == (2, 2)
    assert facade.calls == [('known', 1), ('known', 2)]
    with facade.side.session() as session:
        status = queue_status(session, 'facade')
    assert status['inbound']['refused'] == 2
    assert all(f['refused'] and "of kind 'unknown.kind'" in f['error']
               for f in status['failures'])
    assert facade.apply().failed == 0  # never retried by itself
    tm = transaction.TransactionManager(explicit=True)
    session = make_session(facade.side.engine, tm)
    assert purge(session, tm, 0).refused == 2
    session.close()


def test_accept_from_narrows_the_senders(apps):
    central, facade = apps
    facade.handle('only.branch', accept_from=['branch'])
    facade.handle('only.central', accept_from='central')
    central.send(('only.branch', 1), ('only.central', 2))
    carry(central, facade)
    assert (facade.apply().applied, facade.calls) == (1, [('only.central', 2)])
    error, = [row['last_error'] for row in inbound(facade) if row['refused_at']]
    assert "taken from branch only" in error


def test_a_handler_may_refuse(apps):
    central, facade = apps

    def refuse(message):
        raise Refused('no such order here')
    facade.handle('refuse', refuse)
    central.send(('refuse', 1, 'k'), ('refuse', 2, 'k'))
    carry(central, facade)
    assert facade.apply().failed == 2  # a refusal holds nothing back
    assert all(row['refused_at'] for row in inbound(facade))


def test_applied_without_the_registry_fails_instead_of_refusing(apps):
    central, facade = apps
    facade.handle('later')
    central.send(('later', 1))
    carry(central, facade)
    assert facade.apply(registry=None).failed == 1
    row, = inbound(facade)
    assert row['refused_at'] is None and 'registry' in row['last_error']
    assert facade.apply().applied == 1


def test_a_handler_that_sends_starts_a_new_message_and_nothing_echoes(apps):
    central, facade = apps
    facade.handle('ping', lambda m: send(m.session, 'pong', m.payload + 1))
    central.handle('pong')
    central.send(('ping', 1))
    carry(central, facade)
    assert facade.apply().applied == 1
    carry(facade, central)
    assert central.apply().applied == 1
    assert central.calls == [('pong', 2)]
    assert facade.side.count('outbound_messages', 'delivered_at IS NULL') == 0
    assert central.side.count('outbound_messages', 'delivered_at IS NULL') == 0


def test_what_a_handler_changes_is_autopublished_as_its_own(apps):
    from pyramid_communicator.demo.models import Tag

    central, facade = apps
    facade.handle('tag', lambda m: m.session.add(Tag(name=m.payload)))
    central.send(('tag', 'from-a-handler'))
    carry(central, facade)
    assert facade.apply().applied == 1
    out, = facade.side.rows('outbound_messages')
    assert json.loads(out['body']) == {'tag': {'name': 'from-a-handler', 'label': None,
                                               'color': None, 'weight': None}}


# -- configuration -----------------------------------------------------------------

def test_scan_finds_decorated_handlers_and_a_second_handler_conflicts(make_side):
    app = App(make_side('facade'))
    table = messages.handlers(app.registry)
    assert table['contact.submitted'].accept_from == frozenset({'facade'})
    assert table['contact.acknowledged'].accept_from == frozenset({'central'})
    config = Configurator(settings=app_settings(make_side('central')))
    config.include('pyramid_communicator.demo.models')
    config.include('pyramid_communicator')
    config.add_message_handler('twice', lambda m: None)
    config.add_message_handler('twice', lambda m: None)
    with pytest.raises(ConfigurationConflictError):
        config.commit()
    with pytest.raises(ValueError, match='kind'):
        message_handler('not a kind')
    with pytest.raises(ValueError, match='accept_from'):
        message_handler('x', accept_from='not a name!')


def test_no_model_may_take_a_reserved_name():
    from pyramid_communicator import receives_from

    with pytest.raises(ValueError, match='reserved'):
        receives_from('@message')(type('Nope', (), {}))


# -- a hostile peer -----------------------------------------------------------------

def plain(remote_id: int, kind: Any = 'contact.acknowledged', payload: Any = None,
          **extra: Any) -> dict[str, Any]:
    fields = {'kind': kind, 'payload': {'ref': 1} if payload is None else payload,
              'key': None, 'sent_at': None}
    fields.update(extra.pop('fields', {}))
    return {'id': remote_id, 'body': json.dumps({'@message': fields}),
            'origin': None, 'original_id': None, 'format': wire.MESSAGE_FORMAT, **extra}


def test_a_hostile_peer_gets_nothing_run_that_it_may_not(webapp, make_side):
    facade_side = make_side('facade')
    app = webapp(facade_side)
    with facade_side.session() as session:
        session.add(ContactRequest(name='n', email='e', text='t', status='sent'))
    nested = {'ref': 1}
    for _ in range(100):
        nested = {'x': nested}
    very_deep = '[' * 100_000 + ']' * 100_000
    attacks = [
        plain(1, kind='contact.submitted'),       # a kind taken from the facade only
        plain(2, kind='no.such.kind'),           # no handler
        plain(3, format=2),                       # a plain body in a record's format
        plain(4, origin='central', original_id=5),  # with a record's identity
        plain(5, payload=nested),                 # nested too deeply
        {**plain(6), 'body': '{"@message":{"kind":"x","payload":' + very_deep + '}}'},
        plain(7, fields={'kind': 'bad kind'}),
        plain(8, fields={'extra': 1}),
        plain(9),                                 # the one allowed: acknowledged
    ]
    response = app.post(
        '/messages.json', json.dumps(attacks).encode(), content_type='application/json',
        headers=NAMED, expect_errors=True)
    assert response.status_int == 202, response.text
    rows = {row['remote_id']: row for row in facade_side.rows('inbound_messages')}
    assert rows[9]['processed_at'] is not None and rows[9]['last_error'] is None
    for remote_id in range(1, 9):
        assert rows[remote_id]['refused_at'] is not None, rows[remote_id]
        assert rows[remote_id]['processed_at'] is None
    assert "taken from facade only" in rows[1]['last_error']
    assert 'needs format 3' in rows[3]['last_error']
    assert 'levels deep' in rows[5]['last_error']
    assert 'nested too deeply' in rows[6]['last_error']
    status, = [r['status'] for r in facade_side.rows('contact_requests')]
    assert status == 'acknowledged'
    huge = [plain(10, payload='a' * (11 * 1024 * 1024))]
    response = app.post('/messages.json', json.dumps(huge).encode(),
                        content_type='application/json', headers=NAMED,
                        expect_errors=True)
    assert response.status_int == 413
    assert 10 not in {row['remote_id'] for row in facade_side.rows('inbound_messages')}


def test_a_gem_never_has_a_plain_message_applied(make_side):
    """The gem sends no format: a plain body from it is refused on arrival."""
    parsed = wire.parse_messages(json.dumps([{**plain(1), 'format': None}]))
    assert 'needs format 3' in parsed[0].error


# -- end to end ---------------------------------------------------------------------

@pytest.mark.slow
def test_the_contact_form_end_to_end(pair):
    import requests

    central, facade = pair
    for n in range(3):
        requests.post(facade.url + '/contact', json={
            'name': f'Visitor {n}', 'email': f'v{n}@example.org', 'text': f'Hello {n}'},
            timeout=10).raise_for_status()
    central.sync()  # pulls the three, handles them, queues three acknowledgements
    received = central.side.rows('contact_requests')
    assert [(r['name'], r['status'], r['origin'], r['ref']) for r in received] == [
        (f'Visitor {n}', 'received', 'facade', n + 1) for n in range(3)]
    central.sync()  # pushes the acknowledgements
    sent = requests.get(facade.url + '/contact', timeout=10).json()['contact_requests']
    assert [r['status'] for r in sent] == ['acknowledged'] * 3
    central.sync()
    assert central.side.count('contact_requests') == 3  # nothing twice, nothing echoed
    assert central.side.count('outbound_messages', 'delivered_at IS NULL') == 0
    assert facade.side.count('outbound_messages', 'delivered_at IS NULL') == 0
