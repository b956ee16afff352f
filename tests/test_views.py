"""The server side as a peer (or the Ruby gem's client) sees it, through
WebTest: ``GET``/``POST /messages.json`` and ``POST
/messages/delivered.json``, their refusals, and how the routes behave
inside host apps with security policies, CSRF defaults, a route prefix or
a differently named session.
"""
from __future__ import annotations

import base64
import json
import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import PASSWORD, USERNAME, Side, app_settings
from pyramid.config import Configurator
from pyramid.csrf import CookieCSRFStoragePolicy
from pyramid.httpexceptions import HTTPException
from pyramid.request import Request
from pyramid.response import Response
from pyramid.security import NO_PERMISSION_REQUIRED, Denied
from webtest import TestApp

from pyramid_communicator import get_settings, publish
from pyramid_communicator.demo.models import (
    Post,
    get_engine,
    get_session_factory,
    get_tm_session,
)

MESSAGES = '/messages.json'
DELIVERED = '/messages/delivered.json'


# -- helpers -------------------------------------------------------------------

def basic(username: str = USERNAME, password: str = PASSWORD) -> dict[str, str]:
    token = base64.b64encode(f'{username}:{password}'.encode()).decode('ascii')
    return {'Authorization': f'Basic {token}'}


def record(title: str = 'Hello', name: str = 'post', **attributes: Any) -> str:
    """A wire ``body``: the JSON *string* ``{name: {attributes}}``."""
    return json.dumps({name: {'title': title, **attributes}})


def message(remote_id: int, body: str | None = None, origin: str | None = None,
            original_id: int | None = None) -> dict[str, Any]:
    return {'id': remote_id, 'body': body if body is not None else record(f'Post {remote_id}'),
            'origin': origin, 'original_id': original_id}


def post_json(app: TestApp, raw: bytes | str, url: str = MESSAGES,
              headers: dict[str, str] | None = None, **kw: Any):
    """POST raw bytes as JSON with our credentials unless told otherwise;
    the response whatever its status."""
    if isinstance(raw, str):
        raw = raw.encode('utf-8')
    return app.post(url, raw, headers=basic() if headers is None else headers,
                    content_type='application/json', expect_errors=True, **kw)


def post_messages(app: TestApp, messages: list[dict[str, Any]], **kw: Any):
    return post_json(app, json.dumps(messages), **kw)


def get_messages(app: TestApp, query: str, headers: dict[str, str] | None = None,
                 url: str = MESSAGES):
    """GET as our client does: it asks for JSON (the gem's client does not)."""
    headers = basic() if headers is None else headers
    return app.get(f'{url}?{query}', headers={'Accept': 'application/json', **headers},
                   expect_errors=True)


def publish_posts(side: Side, count: int) -> list[int]:
    """Create and publish ``count`` posts directly in the side's database;
    returns the outbound message ids, ascending."""
    with side.session() as session:
        for number in range(count):
            post = Post(title=f'Title {number}', body=f'Body {number}', slug=f'slug-{number}')
            session.add(post)
            session.flush()
            publish(session, post)
    return [row['id'] for row in side.rows('outbound_messages')]


def delivered_ids(side: Side) -> list[int]:
    return [row['id'] for row in side.rows('outbound_messages')
            if row['delivered_at'] is not None]


def assert_one_line_error(response, status: int) -> str:
    """A JSON ``{"error": reason}`` of one line, with the expected status."""
    assert response.status_int == status, response.body[:300]
    assert response.content_type == 'application/json'
    reason = response.json['error']
    assert isinstance(reason, str) and reason
    assert '\n' not in reason and '\r' not in reason
    return reason


def assert_nothing_stored(side: Side) -> None:
    assert side.count('inbound_messages') == 0
    assert side.count('posts') == 0


@pytest.fixture
def facade(make_side) -> Side:
    return make_side('facade')


@pytest.fixture
def app(webapp, facade: Side) -> TestApp:
    # The messages posted here are the gem's client's: no versions.
    return webapp(facade, **{'communicator.gem_peer': 'true'})


# -- GET /messages.json ------------------------------------------------------------

def test_get_serves_messages_from_id_ascending_and_marks_them_delivered(app, facade) -> None:
    ids = publish_posts(facade, 4)
    response = get_messages(app, f'from_id={ids[1]}')
    assert response.status_int == 200
    assert response.content_type == 'application/json'
    served = response.json
    assert [m['id'] for m in served] == ids[1:]
    for item in served:
        assert set(item) == {'id', 'body', 'origin', 'original_id', 'version', 'format'}
        assert isinstance(item['body'], str)
    # The gem's client counts what it got as delivered; the first stays pending.
    assert delivered_ids(facade) == ids[1:]


def test_get_body_is_a_json_string_of_the_record(app, facade) -> None:
    publish_posts(facade, 1)
    served, = get_messages(app, 'from_id=1').json
    assert json.loads(served['body']) == {
        'post': {'title': 'Title 0', 'body': 'Body 0', 'slug': 'slug-0', 'published_on': None}}


def test_get_without_accept_json_is_the_same_json_as_text_plain(app, facade) -> None:
    """The gem's client sends no Accept header and parses the reply itself."""
    ids = publish_posts(facade, 2)
    response = app.get('/messages.json?from_id=0', headers=basic())
    assert response.status_int == 200
    assert response.content_type == 'text/plain'
    assert [m['id'] for m in json.loads(response.text)] == ids
    assert response.headers['X-Communicator-Name'] == 'facade'
    assert int(response.headers['Content-Length']) == len(response.body)


def test_get_empty_queue_is_an_empty_array(app) -> None:
    response = get_messages(app, 'from_id=1')
    assert response.status_int == 200
    assert response.json == []
    assert 'X-Communicator-More' not in response.headers


def test_get_without_pending_serves_again_whatever_was_delivered(app, facade) -> None:
    """The gem's client moves its own cursor: asking from the same id again
    gets the same messages."""
    ids = publish_posts(facade, 2)
    first = get_messages(app, f'from_id={ids[0]}').json
    again = get_messages(app, f'from_id={ids[0]}').json
    assert first == again
    assert [m['id'] for m in again] == ids


def test_get_pending_serves_unacknowledged_whatever_from_id(app, facade) -> None:
    ids = publish_posts(facade, 3)
    get_messages(app, f'from_id={ids[2]}')  # the gem's way: the last one is delivered
    for from_id in (0, 1, ids[2], 10 ** 9):
        response = get_messages(app, f'from_id={from_id}&pending=1')
        assert response.status_int == 200
        assert [m['id'] for m in response.json] == ids[:2]
    # Serving with pending=1 marks nothing: only an acknowledgement does.
    assert delivered_ids(facade) == ids[2:]


def test_get_honours_batch_size_and_says_more_are_waiting(webapp, facade) -> None:
    app = webapp(facade, **{'communicator.batch_size': 2})
    ids = publish_posts(facade, 5)

    first = get_messages(app, 'from_id=0')
    assert [m['id'] for m in first.json] == ids[:2]
    assert first.headers['X-Communicator-More'] == '1'
    assert delivered_ids(facade) == ids[:2]

    pending = get_messages(app, 'from_id=0&pending=1')
    assert [m['id'] for m in pending.json] == ids[2:4]
    assert pending.headers['X-Communicator-More'] == '1'

    last = get_messages(app, f'from_id={ids[4]}')
    assert [m['id'] for m in last.json] == ids[4:]
    assert 'X-Communicator-More' not in last.headers


def test_get_exactly_a_batch_says_nothing_more(webapp, facade) -> None:
    app = webapp(facade, **{'communicator.batch_size': 2})
    publish_posts(facade, 2)
    response = get_messages(app, 'from_id=0&pending=1')
    assert len(response.json) == 2
    assert 'X-Communicator-More' not in response.headers


def test_replies_carry_name_and_protocol_headers(app, facade) -> None:
    publish_posts(facade, 1)
    replies = [get_messages(app, 'from_id=1'), get_messages(app, 'from_id=1&pending=1'),
               post_messages(app, []), post_json(app, '{"ids": []}', url=DELIVERED)]
    for reply in replies:
        assert reply.status_int in (200, 202)
        assert reply.headers['X-Communicator-Name'] == 'facade'
        assert reply.headers['X-Communicator-Protocol'] == '2'


def test_locally_originated_record_carries_app_name_and_its_id(app, facade) -> None:
    with facade.session() as session:
        post = Post(title='Local', body='made here')
        session.add(post)
        session.flush()
        publish(session, post)
        post_id = post.id
    served, = get_messages(app, 'from_id=0&pending=1').json
    assert served['origin'] == 'facade'
    assert served['original_id'] == post_id


def test_unsaved_record_is_sent_without_identity(app, facade) -> None:
    with facade.session() as session:
        publish(session, Post(title='Never flushed'))
    served, = get_messages(app, 'from_id=0&pending=1').json
    assert served['origin'] is None
    assert served['original_id'] is None
    assert json.loads(served['body'])['post']['title'] == 'Never flushed'


def test_record_received_from_peer_keeps_the_peers_identity_when_republished(app, facade) -> None:
    response = post_messages(app, [message(1, record('From central'), 'central', 7)],
                             headers={**basic(), 'X-Communicator-Name': 'central'})
    assert response.status_int == 202
    local, = facade.rows('posts')
    with facade.session() as session:
        publish(session, session.get(Post, local['id']))
    served, = get_messages(app, 'from_id=0&pending=1').json
    assert (served['origin'], served['original_id']) == ('central', 7)


@pytest.mark.parametrize('query', [
    '',
    'pending=1',
    'from_id=',
    'from_id=abc',
    'from_id=-1',
    'from_id=1.5',
    'from_id=0x10',
    'from_id=9223372036854775808',
    'from_id=%ff',
    'from_id=%ff&pending=1',
], ids=lambda q: q or 'no-query')
def test_get_with_bad_from_id_is_400_with_one_line(app, facade, query: str) -> None:
    ids = publish_posts(facade, 1)
    assert_one_line_error(get_messages(app, query), 400)
    assert delivered_ids(facade) == []
    assert ids  # the queue was not empty: nothing served, nothing marked


# -- POST /messages.json -----------------------------------------------------------

def test_post_stores_and_applies_the_messages(app, facade) -> None:
    messages = [message(1, record('First', body='one'), 'central', 11),
                message(2, record('Second', body='two'), 'central', 12)]
    response = post_messages(app, messages, headers={**basic(), 'X-Communicator-Name': 'central'})
    assert response.status_int == 202
    assert response.json == {'received': 2}
    stored = facade.rows('inbound_messages')
    assert [(r['sender'], r['remote_id'], r['origin'], r['original_id']) for r in stored] == [
        ('central', 1, 'central', 11), ('central', 2, 'central', 12)]
    assert all(r['processed_at'] is not None for r in stored)
    assert [(p['title'], p['body']) for p in facade.rows('posts')] == [
        ('First', 'one'), ('Second', 'two')]
    # Applying a received record publishes nothing back (no echo).
    assert facade.count('outbound_messages') == 0


def test_post_empty_array_is_202_and_stores_nothing(app, facade) -> None:
    response = post_json(app, '[]')
    assert response.status_int == 202
    assert response.json == {'received': 0}
    assert_nothing_stored(facade)


def test_post_same_array_twice_stores_and_applies_once(app, facade) -> None:
    """Messages without identity would create a second post if applied
    twice: the count of posts shows they were not."""
    messages = [message(1, record('Only once')), message(2, record('Also once'))]
    headers = {**basic(), 'X-Communicator-Name': 'central'}
    for _ in range(2):
        assert post_messages(app, messages, headers=headers).status_int == 202
    assert facade.count('inbound_messages') == 2
    assert sorted(p['title'] for p in facade.rows('posts')) == ['Also once', 'Only once']


def test_same_remote_ids_from_another_sender_are_other_messages(app, facade) -> None:
    post_messages(app, [message(1)], headers={**basic(), 'X-Communicator-Name': 'central'})
    post_messages(app, [message(1)], headers={**basic(), 'X-Communicator-Name': 'branch'})
    assert sorted(r['sender'] for r in facade.rows('inbound_messages')) == ['branch', 'central']


def test_sender_is_the_name_header_else_the_basic_user(app, facade) -> None:
    post_messages(app, [message(1)], headers={**basic(), 'X-Communicator-Name': 'central'})
    post_messages(app, [message(1)])
    assert [r['sender'] for r in facade.rows('inbound_messages')] == ['central', USERNAME]


def test_post_with_apply_on_receive_off_only_stores(webapp, facade) -> None:
    app = webapp(facade, **{'communicator.apply_on_receive': 'false'})
    assert post_messages(app, [message(1)]).status_int == 202
    stored, = facade.rows('inbound_messages')
    assert stored['processed_at'] is None
    assert facade.count('posts') == 0


def test_non_ascii_text_survives_the_round_trip(app, facade) -> None:
    title = 'Grüße 😀 ✓ 漢字'
    raw = json.dumps([message(1, json.dumps({'post': {'title': title}}, ensure_ascii=False))],
                     ensure_ascii=False)
    assert post_json(app, raw).status_int == 202
    post, = facade.rows('posts')
    assert post['title'] == title


def test_message_the_app_cannot_apply_is_accepted_and_kept(app, facade) -> None:
    """Well-formed but unknown record name or failing validation: the wire
    format is fine, so it is stored and kept with its error, not refused."""
    messages = [message(1, json.dumps({'no_such_model': {'x': 1}})),
                message(2, record(''))]  # the demo rejects empty titles
    assert post_messages(app, messages).status_int == 202
    stored = facade.rows('inbound_messages')
    assert [r['processed_at'] for r in stored] == [None, None]
    assert all(r['last_error'] for r in stored)
    assert facade.count('posts') == 0


# -- bad input: a malformed message is refused alone ------------------------------

GOOD = message(1)


def array(*items: Any) -> bytes:
    return json.dumps(list(items)).encode('utf-8')


def with_(**changes: Any) -> dict[str, Any]:
    return {**GOOD, **changes}


def without(key: str) -> dict[str, Any]:
    return {k: v for k, v in GOOD.items() if k != key}


#: Not an array of messages at all: the whole body is refused.
BAD_INPUT: list[tuple[str, bytes]] = [
    ('empty body', b''),
    ('malformed json', b'[{"id": 1,'),
    ('trailing garbage', array(GOOD) + b' x'),
    ('object instead of array', json.dumps(GOOD).encode()),
    ('string instead of array', b'"[]"'),
    ('null', b'null'),
    ('id of 5000 digits', b'[{"id": ' + b'9' * 5000 + b', "body": "{\\"post\\": {}}"}]'),
    ('deeply nested arrays', b'[' * 100000),
    ('deeply nested closed arrays', b'[' * 100000 + b']' * 100000),
    ('deeply nested objects', b'{"a":' * 100000 + b'1' + b'}' * 100000),
    ('non-utf-8', b'[{"id": 1, "body": "\xff\xfe"}]'),
    ('latin-1 text',
     '[{"id": 1, "body": "{\\"post\\": {\\"title\\": \\"Grüße\\"}}"}]'.encode('latin-1')),
    ('utf-16 bom garbage', b'\xff\xfe[\x00'),
    ('nul bytes', b'\x00' * 16),
]

#: Items without a usable id: neither stored nor acknowledged, only counted.
NO_USABLE_ID: list[tuple[str, bytes]] = [
    ('array of numbers', b'[1, 2]'),
    ('array of arrays', b'[[1]]'),
    ('id missing', array(without('id'))),
    ('id as string', array(with_(id='1'))),
    ('id as bool', array(with_(id=True))),
    ('id as float', array(with_(id=1.0))),
    ('id zero', array(with_(id=0))),
    ('id negative', array(with_(id=-1))),
    ('id too big', array(with_(id=2 ** 63))),
    ('id NaN', b'[{"id": NaN, "body": "{\\"post\\": {}}"}]'),
]

#: A usable id, the rest malformed: stored refused, with the reason.
MALFORMED: list[tuple[str, bytes]] = [
    ('body missing', array(without('body'))),
    ('body null', array(with_(body=None))),
    ('body an object', array(with_(body={'post': {'title': 'x'}}))),
    ('body a number', array(with_(body=5))),
    ('body not json', array(with_(body='title=x'))),
    ('body a json array', array(with_(body='[{"post": {}}]'))),
    ('body a json string', array(with_(body='"post"'))),
    ('body with two records', array(with_(body='{"post": {}, "comment": {}}'))),
    ('body with no record', array(with_(body='{}'))),
    ('body attributes not an object', array(with_(body='{"post": ["title"]}'))),
    ('body attributes a string', array(with_(body='{"post": "title"}'))),
    ('body with trailing garbage', array(with_(body='{"post": {}} x'))),
    ('body deeply nested',
     array(with_(body='{"post": {"a": ' + '[' * 100000 + ']' * 100000 + '}}'))),
    ('body with lone surrogate',
     b'[{"id": 1, "body": "{\\"post\\": {\\"title\\": \\"\\ud800\\"}}"}]'),
    ('body with NUL', b'[{"id": 1, "body": "{\\"post\\": {\\"title\\": \\"a\\u0000\\"}}"}]'),
    ('record name with lone surrogate', b'[{"id": 1, "body": "{\\"po\\ud800\\": {}}"}]'),
    ('record name with NUL', b'[{"id": 1, "body": "{\\"po\\u0000\\": [1]}"}]'),
    ('origin not a string', array(with_(origin=5))),
    ('origin a list', array(with_(origin=['central']))),
    ('origin empty', array(with_(origin=''))),
    ('origin too long', array(with_(origin='x' * 65))),
    ('origin with lone surrogate', b'[{"id": 1, "body": "{\\"post\\": {}}", "origin": "\\ud800"}]'),
    ('origin with NUL', b'[{"id": 1, "body": "{\\"post\\": {}}", "origin": "cen\\u0000tral"}]'),
    ('original_id a string', array(with_(origin='central', original_id='7'))),
    ('original_id a float', array(with_(origin='central', original_id=7.5))),
    ('original_id a bool', array(with_(origin='central', original_id=False))),
    ('original_id too big', array(with_(origin='central', original_id=2 ** 63))),
    ('format a string', array(with_(format='2'))),
    ('format zero', array(with_(format=0))),
    ('version not an object', array(with_(version='new'))),
    ('version without clock', array(with_(version={'stamps': {}}))),
    ('refs not an object', array(with_(refs=['central', 1]))),
    ('refs of a bad pair', array(with_(refs={'post_id': ['central']}))),
]

NAMED = {**basic(), 'X-Communicator-Name': 'central'}


@pytest.mark.parametrize('raw', [raw for _, raw in BAD_INPUT],
                         ids=[name for name, _ in BAD_INPUT])
def test_bad_input_is_4xx_one_line_and_nothing_stored(app, facade, raw: bytes) -> None:
    response = post_json(app, raw, headers=NAMED)
    assert_one_line_error(response, 400)
    assert_nothing_stored(facade)


@pytest.mark.parametrize('raw', [raw for _, raw in NO_USABLE_ID],
                         ids=[name for name, _ in NO_USABLE_ID])
def test_items_without_a_usable_id_are_skipped_and_counted(app, facade, raw: bytes) -> None:
    response = post_json(app, raw, headers=NAMED)
    assert response.status_int == 202
    assert response.json['received'] == 0
    assert response.json['skipped'] == len(json.loads(raw))
    assert_nothing_stored(facade)


def refused_rows(side: Side) -> list[dict[str, Any]]:
    return [row for row in side.rows('inbound_messages') if row['refused_at'] is not None]


@pytest.mark.parametrize('raw', [raw for _, raw in MALFORMED],
                         ids=[name for name, _ in MALFORMED])
def test_a_malformed_message_is_stored_refused_with_its_reason(app, facade,
                                                               raw: bytes) -> None:
    response = post_json(app, raw, headers=NAMED)
    assert response.status_int == 202
    assert response.json == {'received': 1, 'refused': 1}
    row, = facade.rows('inbound_messages')
    assert row['sender'] == 'central' and row['remote_id'] == 1
    assert row['refused_at'] is not None and row['processed_at'] is None
    assert row['last_error'].startswith('refused: "')
    assert '\n' not in row['last_error'] and len(row['last_error']) < 300
    assert '\x00' not in row['body'] and row['body'].isascii()
    assert len(row['body']) <= 4000
    assert facade.count('posts') == 0


def test_one_malformed_message_among_valid_ones_is_refused_alone(app, facade) -> None:
    """What the sender sees: 202 for the batch; what the receiver keeps:
    the valid messages applied, the bad one refused and shown in status."""
    bad = {**message(3), 'version': {'clock': 'not a clock'}}
    messages = [message(1, record('One')), message(2, record('Two')), bad,
                message(4, record('Four')), {'id': 'x', 'body': record('No id')}]
    response = post_messages(app, messages, headers=NAMED)
    assert response.status_int == 202
    assert response.json == {'received': 4, 'refused': 1, 'skipped': 1}
    assert sorted(p['title'] for p in facade.rows('posts')) == ['Four', 'One', 'Two']
    rows = {row['remote_id']: row for row in facade.rows('inbound_messages')}
    assert sorted(rows) == [1, 2, 3, 4]
    assert all(rows[n]['processed_at'] is not None for n in (1, 2, 4))
    refused, = refused_rows(facade)
    assert refused['remote_id'] == 3 and refused['processed_at'] is None
    assert refused['last_error'].startswith('refused: "version" must be')
    assert json.loads(refused['body'])['version'] == {'clock': 'not a clock'}

    status = app.get('/status.json', headers=basic()).json
    assert status['inbound']['refused'] == 1
    assert status['inbound']['pending'] == 0
    shown, = status['failures']
    assert shown['refused'] and shown['remote_id'] == 3
    assert shown['error'].startswith('refused: "version"')

    # Sent again (the 202 was lost): nothing is stored or applied twice.
    assert post_messages(app, messages, headers=NAMED).status_int == 202
    assert facade.count('inbound_messages') == 4
    assert facade.count('posts') == 3


def test_a_refused_message_revived_by_an_operator_fails_rather_than_applies(
        app, facade) -> None:
    """``--retry ID`` clears ``refused_at``; what is stored of a malformed
    message is never a record, so it fails and nothing is written."""
    from pyramid_communicator.status import revive
    from pyramid_communicator.sync import apply_inbound

    assert post_json(app, array(with_(origin=5)), headers=NAMED).status_int == 202
    row, = facade.rows('inbound_messages')
    with facade.session() as session:
        assert revive(session, [row['id']]) == 1
    settings = get_settings(app.app.registry)
    result = apply_inbound(facade.engine, settings, retry_now=True)
    assert (result.applied, result.failed) == (0, 1)
    assert facade.count('posts') == 0


def test_duplicate_ids_are_all_skipped_and_the_rest_applied(app, facade) -> None:
    raw = array(message(1, record('First')), message(2, record('Second')),
                message(1, record('Other first')))
    response = post_json(app, raw, headers=NAMED)
    assert response.status_int == 202
    assert response.json == {'received': 1, 'skipped': 2}
    assert [r['remote_id'] for r in facade.rows('inbound_messages')] == [2]
    assert [p['title'] for p in facade.rows('posts')] == ['Second']


@pytest.mark.parametrize('name', ['cen\x00tral', 'my peer', 'x' * 65, 'zentrale-ü'])
def test_bad_sender_name_header_is_400_and_nothing_stored(app, facade, name: str) -> None:
    """The header names the peer's ``communicator.name``; anything else
    would be stored as the sender (and PostgreSQL refuses a NUL)."""
    response = post_json(app, array(message(1)),
                         headers={**basic(), 'X-Communicator-Name': name})
    assert_one_line_error(response, 400)
    assert_nothing_stored(facade)


def test_a_peer_with_this_apps_own_name_is_refused(app, facade) -> None:
    """Two apps configured with one name would mix up whose records are
    whose: every route refuses the request (the facade's name here)."""
    headers = {**basic(), 'X-Communicator-Name': 'facade'}
    publish_posts(facade, 1)
    assert 'own' in assert_one_line_error(post_json(app, array(message(1)), headers=headers),
                                          400)
    assert_one_line_error(get_messages(app, 'from_id=0', headers=headers), 400)
    assert_one_line_error(post_json(app, '{"ids": [1]}', url=DELIVERED, headers=headers), 400)
    assert facade.count('inbound_messages') == 0
    assert delivered_ids(facade) == []


def test_a_client_without_a_name_is_stored_under_a_valid_name(webapp, make_side) -> None:
    """The gem's client sends no name: its Basic user name stands in,
    made a name (stored as ``sender`` and in the state rows)."""
    facade = make_side('facade')
    app = webapp(facade, **{'communicator.username': 'sync@example.com/\u00e9'})
    headers = basic('sync@example.com/\u00e9')
    assert post_json(app, array(message(1)), headers=headers).status_int == 202
    assert get_messages(app, 'from_id=0', headers=headers).status_int == 200
    stored, = facade.rows('inbound_messages')
    assert stored['sender'] == 'sync_example.com__'
    peers = {row['value'] for row in facade.rows('communicator_state', order_by='updated_at')
             if row['key'] in ('last_received_at', 'last_served_at')}
    assert peers == {'sync_example.com__'}


def test_acknowledgements_are_bounded(webapp, facade) -> None:
    app = webapp(facade, **{'communicator.batch_size': 10})
    ids = publish_posts(facade, 2)
    too_many = json.dumps({'ids': ids + list(range(10 ** 6, 10 ** 6 + 999))})
    assert 'at most 1000 ids' in assert_one_line_error(
        post_json(app, too_many, url=DELIVERED), 400)
    assert delivered_ids(facade) == []
    enough = json.dumps({'ids': ids + list(range(10 ** 6, 10 ** 6 + 998))})
    assert post_json(app, enough, url=DELIVERED).json == {'acknowledged': 2}


@pytest.mark.parametrize('seed', range(12))
def test_random_bytes_never_give_a_500(app, facade, seed: int) -> None:
    rng = random.Random(seed)
    raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 600)))
    response = post_json(app, raw)
    assert 400 <= response.status_int < 500
    assert_one_line_error(response, response.status_int)
    assert_nothing_stored(facade)


def test_body_over_max_body_bytes_is_413_and_nothing_stored(webapp, facade) -> None:
    app = webapp(facade, **{'communicator.max_body_bytes': 2000})
    small = array(message(1))
    large = array(*(message(n, record('x' * 100)) for n in range(1, 30)))
    assert len(small) < 2000 < len(large)
    assert_one_line_error(post_json(app, large), 413)
    assert_nothing_stored(facade)
    assert_one_line_error(post_json(app, b'{"ids": [' + b'1, ' * 1000 + b'1]}',
                                    url=DELIVERED), 413)
    # The limit is the limit, not a refusal of everything.
    assert post_json(app, small).status_int == 202
    assert facade.count('inbound_messages') == 1


# -- POST /messages/delivered.json ---------------------------------------------------

def test_acknowledged_messages_are_no_longer_served(app, facade) -> None:
    ids = publish_posts(facade, 3)
    assert [m['id'] for m in get_messages(app, 'from_id=0&pending=1').json] == ids
    response = post_json(app, json.dumps({'ids': ids[:2]}), url=DELIVERED)
    assert response.status_int == 200
    assert response.json == {'acknowledged': 2}
    assert [m['id'] for m in get_messages(app, 'from_id=0&pending=1').json] == ids[2:]
    assert delivered_ids(facade) == ids[:2]


def test_acknowledging_twice_or_unknown_ids_is_harmless(app, facade) -> None:
    ids = publish_posts(facade, 2)
    post_json(app, json.dumps({'ids': ids[:1]}), url=DELIVERED)
    response = post_json(app, json.dumps({'ids': [ids[0], 10 ** 9]}), url=DELIVERED)
    assert response.status_int == 200
    assert response.json == {'acknowledged': 0}
    assert delivered_ids(facade) == ids[:1]


@pytest.mark.parametrize('raw', [
    b'', b'not json', b'[1, 2]', b'{"ids": "1"}', b'{"ids": [true]}', b'{"ids": [0]}',
    b'{"ids": [-1]}', b'{"ids": [1.5]}', b'{"id": [1]}', b'[' * 100000, b'\xff\xfe',
])
def test_bad_acknowledgement_is_400_and_marks_nothing(app, facade, raw: bytes) -> None:
    publish_posts(facade, 2)
    assert_one_line_error(post_json(app, raw, url=DELIVERED), 400)
    assert delivered_ids(facade) == []


# -- authentication ------------------------------------------------------------------

def _token(raw: bytes) -> str:
    return base64.b64encode(raw).decode('ascii')


BAD_CREDENTIALS: list[tuple[str, dict[str, str]]] = [
    ('none', {}),
    ('wrong user', basic('someone', PASSWORD)),
    ('wrong password', basic(USERNAME, 'not-the-password')),
    ('password prefix', basic(USERNAME, PASSWORD[:-1])),
    ('password longer', basic(USERNAME, PASSWORD + 'x')),
    ('empty password', basic(USERNAME, '')),
    ('swapped', basic(PASSWORD, USERNAME)),
    ('scheme only', {'Authorization': 'Basic'}),
    ('not base64', {'Authorization': 'Basic !!!not-base64!!!'}),
    ('no colon', {'Authorization': 'Basic ' + _token(USERNAME.encode())}),
    ('not utf-8', {'Authorization': 'Basic ' + _token(b'\xff\xfe:\xfd')}),
    ('bearer', {'Authorization': 'Bearer ' + _token(f'{USERNAME}:{PASSWORD}'.encode())}),
    ('empty header', {'Authorization': ''}),
]


@pytest.mark.parametrize('headers', [h for _, h in BAD_CREDENTIALS],
                         ids=[name for name, _ in BAD_CREDENTIALS])
def test_bad_credentials_are_401_and_nothing_happens(app, facade,
                                                     headers: dict[str, str]) -> None:
    ids = publish_posts(facade, 2)
    replies = [
        get_messages(app, 'from_id=0', headers=headers),
        get_messages(app, 'from_id=0&pending=1', headers=headers),
        post_json(app, array(message(1)), headers=headers),
        post_json(app, json.dumps({'ids': ids}), url=DELIVERED, headers=headers),
    ]
    for reply in replies:
        assert_one_line_error(reply, 401)
        assert reply.headers['WWW-Authenticate'].startswith('Basic')
        assert PASSWORD not in reply.text
        assert '"id"' not in reply.text  # no message leaks into a refusal
    assert facade.count('inbound_messages') == 0
    assert facade.count('posts') == len(ids)  # only the ones published here
    assert delivered_ids(facade) == []


# -- other methods ----------------------------------------------------------------------

@pytest.mark.parametrize('method, url, allowed', [
    ('PUT', MESSAGES, 'GET, POST'),
    ('DELETE', MESSAGES, 'GET, POST'),
    ('PATCH', MESSAGES, 'GET, POST'),
    ('GET', DELIVERED, 'POST'),
    ('PUT', DELIVERED, 'POST'),
    ('DELETE', DELIVERED, 'POST'),
])
def test_other_methods_are_405_with_allow(app, facade, method: str, url: str,
                                          allowed: str) -> None:
    response = app.request(url, method=method, headers=basic(), body=array(message(1)),
                           content_type='application/json', expect_errors=True)
    assert_one_line_error(response, 405)
    assert response.headers['Allow'] == allowed
    assert_nothing_stored(facade)


# -- inside host apps ---------------------------------------------------------------------

class DenyEverything:
    """A host security policy that lets nobody do anything."""

    def identity(self, request: Request) -> None:
        return None

    def authenticated_userid(self, request: Request) -> None:
        return None

    def permits(self, request: Request, context: Any, permission: str) -> Denied:
        return Denied('the host lets nobody in')

    def remember(self, request: Request, userid: Any, **kw: Any) -> list:
        return []

    def forget(self, request: Request, **kw: Any) -> list:
        return []


def _host_page(request: Request) -> dict:
    return {'host': 'page'}


def _host_error_page(exc: HTTPException, request: Request) -> Response:
    """The host renders its own errors as HTML; ours must never pass here."""
    return Response(f'<h1>{exc.status}</h1>', status=exc.status, content_type='text/html')


@pytest.fixture
def host_app() -> Iterator[Callable[..., TestApp]]:
    """``host_app(side, route_prefix=None, **settings)``: a strict host app
    (deny-all policy, default permission, CSRF required, HTML error pages)
    that includes the demo's session wiring and our add-on."""
    engines = []

    def make(side: Side, route_prefix: str | None = None, **overrides: Any) -> TestApp:
        settings = app_settings(side, **{'communicator.gem_peer': 'true', **overrides})
        with Configurator(settings=settings) as config:
            config.include('pyramid_communicator.demo.models')
            config.set_security_policy(DenyEverything())
            config.set_default_permission('view')
            config.set_csrf_storage_policy(CookieCSRFStoragePolicy())
            config.set_default_csrf_options(require_csrf=True)
            config.include('pyramid_communicator', route_prefix=route_prefix)
            config.add_route('host.private', '/private')
            config.add_view(_host_page, route_name='host.private', renderer='json')
            config.add_route('host.public', '/public')
            config.add_view(_host_page, route_name='host.public', renderer='json',
                            permission=NO_PERMISSION_REQUIRED)
            config.add_exception_view(_host_error_page, context=HTTPException)
            engines.append(config.registry['dbsession_factory'].kw['bind'])
        return TestApp(config.make_wsgi_app())
    yield make
    for engine in engines:
        engine.dispose()


def test_strict_host_lets_our_routes_work_with_our_credentials(host_app, facade) -> None:
    app = host_app(facade)
    ids = publish_posts(facade, 1)
    response = get_messages(app, 'from_id=0&pending=1')
    assert response.status_int == 200
    assert [m['id'] for m in response.json] == ids
    # POSTs without any CSRF token: the peer is no browser.
    assert post_messages(app, [message(1)]).status_int == 202
    assert post_json(app, json.dumps({'ids': ids}), url=DELIVERED).status_int == 200
    assert facade.count('posts') == 2  # the published one and the received one
    assert delivered_ids(facade) == ids


def test_strict_host_keeps_its_own_protection(host_app, facade) -> None:
    app = host_app(facade)
    assert app.get('/private', headers=basic(), expect_errors=True).status_int == 403
    assert app.get('/public').json == {'host': 'page'}
    # The host's CSRF default still guards its own unsafe requests.
    assert app.post('/public', {'x': '1'}, expect_errors=True).status_int == 400


def test_strict_host_error_pages_never_see_our_refusals(host_app, facade) -> None:
    app = host_app(facade)
    refused = get_messages(app, 'from_id=0', headers={})
    assert_one_line_error(refused, 401)
    assert refused.headers['WWW-Authenticate'].startswith('Basic')
    assert_one_line_error(get_messages(app, 'from_id=x'), 400)
    assert_one_line_error(post_json(app, b'{}'), 400)
    assert_nothing_stored(facade)


def test_route_prefix_moves_our_routes(host_app, facade) -> None:
    app = host_app(facade, route_prefix='/sync')
    ids = publish_posts(facade, 1)
    served = get_messages(app, 'from_id=0&pending=1', url='/sync/messages.json')
    assert [m['id'] for m in served.json] == ids
    assert post_json(app, array(message(1)), url='/sync/messages.json').status_int == 202
    acknowledged = post_json(app, json.dumps({'ids': ids}), url='/sync/messages/delivered.json')
    assert acknowledged.json == {'acknowledged': 1}
    assert get_messages(app, 'from_id=0').status_int == 404
    assert post_json(app, array(message(2)), url=MESSAGES).status_int == 404
    assert facade.count('inbound_messages') == 1


def test_dbsession_setting_names_the_hosts_session_attribute(facade) -> None:
    settings = app_settings(facade, **{'communicator.dbsession': 'db',
                                       'communicator.gem_peer': 'true',
                                       'tm.manager_hook': 'pyramid_tm.explicit_manager'})
    engine = get_engine(settings)
    try:
        with Configurator(settings=settings) as config:
            config.include('pyramid_tm')
            factory = get_session_factory(engine)
            config.add_request_method(lambda request: get_tm_session(factory, request.tm, request),
                                      'db', reify=True)
            config.include('pyramid_communicator')
        app = TestApp(config.make_wsgi_app())
        ids = publish_posts(facade, 1)
        assert [m['id'] for m in get_messages(app, 'from_id=0&pending=1').json] == ids
        assert post_messages(app, [message(1, record('Via request.db'))]).status_int == 202
        assert post_json(app, json.dumps({'ids': ids}), url=DELIVERED).status_int == 200
        assert 'Via request.db' in [p['title'] for p in facade.rows('posts')]
        assert delivered_ids(facade) == ids
    finally:
        engine.dispose()


# -- logs ---------------------------------------------------------------------------------

def test_info_logs_never_show_credentials_or_bodies(app, facade, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    marker = 'BODY-MARKER-4f1c'
    with facade.session() as session:
        post = Post(title=f'Outgoing {marker}', body=marker, slug=f'taken-{marker}')
        session.add(post)
        session.flush()
        publish(session, post)
    headers = {**basic(), 'X-Communicator-Name': 'central'}
    messages = [
        message(1, record(f'Incoming {marker}', body=marker)),
        message(2, record('', body=marker)),                      # fails validation
        message(3, record('Clash', slug=f'taken-{marker}')),      # fails the unique slug
    ]
    assert post_messages(app, messages, headers=headers).status_int == 202
    assert get_messages(app, 'from_id=0', headers=headers).status_int == 200
    wrong = basic(USERNAME, f'wrong-{marker}')
    assert get_messages(app, 'from_id=0', headers=wrong).status_int == 401

    formatter = logging.Formatter('%(name)s %(message)s')
    shown = [formatter.format(r) for r in caplog.records if r.levelno >= logging.INFO]
    assert any('received 3 messages' in line for line in shown)  # the logs say something
    assert any('failed' in line for line in shown)
    secrets = [PASSWORD, marker, headers['Authorization'], headers['Authorization'].split()[1],
               wrong['Authorization'].split()[1]]
    for line in shown:
        for secret in secrets:
            assert secret not in line, line
