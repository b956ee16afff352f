"""Bounded work per request (``communicator.apply_seconds``), the purge
in slices, and tombstones purged once past retention and acknowledged,
without a late message bringing a deleted record back."""
from __future__ import annotations

import datetime
import json
import time
from typing import Any

import pytest
from conftest import Side
from sqlalchemy import text
from test_retention import purge
from test_views import basic, post_messages

from pyramid_communicator import queues, retention, tombstones, wire
from pyramid_communicator.models import communicator_state
from pyramid_communicator.versions import now_hlc

DAY = 24 * 3600 * 1_000_000
CENTRAL = {**basic(), wire.NAME_HEADER: 'central'}


def tag(remote_id: int, original_id: int, name: str, hlc: int | None = None,
        deleted: bool = False, label: str = 'l') -> dict[str, Any]:
    """Central's message for its tag ``original_id``: an edit of every
    attribute (or its delete) stamped ``hlc`` (default: now)."""
    hlc = now_hlc() if hlc is None else hlc
    if deleted:
        version = {'clock': {'central': hlc}, 'deleted': [hlc, 'central']}
        attributes = {'name': name}
    else:
        attributes = {'name': name, 'label': label}
        version = {'clock': {'central': hlc},
                   'stamps': {key: [hlc, 'central'] for key in attributes}}
    return {'id': remote_id, 'body': json.dumps({'tag': attributes}), 'origin': 'central',
            'original_id': original_id, 'version': version}


def backlog(side: Side, first: int, count: int) -> None:
    """Store ``count`` of central's messages, new tags, as if they had
    arrived with the server's apply turned off."""
    messages = wire.parse_messages(json.dumps(
        [tag(first + i, first + i, f'tag-{first + i}') for i in range(count)]))
    with side.session() as session:
        assert len(queues.store_inbound(session, 'central', messages)) == count


def pending(side: Side) -> int:
    return side.count('inbound_messages', 'processed_at IS NULL')


def push(app, messages: list[dict[str, Any]]) -> float:
    """POST as central does; the seconds the reply took."""
    started = time.monotonic()
    response = post_messages(app, messages, headers=CENTRAL)
    assert response.status_int == 202, response.body
    return time.monotonic() - started


def states(side: Side) -> dict[str, str]:
    return {row['key']: row['value'] for row in side.rows('communicator_state', 'updated_at')}


# -- bounded work per request -----------------------------------------------------

def test_a_request_past_its_budget_applies_one_page_and_the_next_go_on(webapp, make_side):
    facade = make_side('facade')
    backlog(facade, 1, 120)
    # Spent before it starts: each request applies one page (batch_size 50).
    app = webapp(facade, **{'communicator.apply_seconds': '0.000001'})
    push(app, [tag(121, 121, 'tag-121')])
    assert facade.count('tags') == 50 and pending(facade) == 71
    push(app, [])
    assert facade.count('tags') == 100
    response = app.post(
        '/messages/delivered.json', json.dumps({'ids': []}),
        headers=CENTRAL, content_type='application/json')  # the acknowledgement too
    assert response.status_int == 200
    assert facade.count('tags') == 121 and pending(facade) == 0


def test_apply_seconds_zero_applies_everything_at_once(webapp, make_side):
    facade = make_side('facade')
    backlog(facade, 1, 120)
    app = webapp(facade, **{'communicator.apply_seconds': '0'})
    push(app, [])
    assert facade.count('tags') == 120 and pending(facade) == 0


@pytest.mark.slow
def test_a_push_behind_a_large_backlog_is_answered_within_the_budget(webapp, make_side):
    facade = make_side('facade')
    backlog(facade, 1, 5000)
    app = webapp(facade, **{'communicator.apply_seconds': '0.25',
                            'communicator.batch_size': '200'})
    seconds = push(app, [tag(5001, 5001, 'tag-5001')])
    applied = facade.count('tags')
    # A generous bound (the budget, the page that runs past it, the store,
    # WebTest, a busy machine), and far below the client's 10 s timeout.
    assert seconds < 3.5, seconds
    assert 200 <= applied < 5001
    replies = [seconds]
    while pending(facade) and len(replies) < 200:  # later exchanges apply the rest
        replies.append(push(app, []))
    assert facade.count('tags') == 5001 and pending(facade) == 0
    assert max(replies) < 3.5, replies
    assert len(replies) > 1


# -- the purge in slices ------------------------------------------------------------

def test_the_server_purges_in_slices_and_goes_on_where_it_stopped(webapp, make_side,
                                                                  monkeypatch):
    facade = make_side('facade')
    backlog(facade, 1, 35)
    app = webapp(facade, **{'communicator.apply_seconds': '0'})
    push(app, [])  # applied, and a purge (nothing old yet)
    assert 'last_purge_at' in states(facade)
    old = datetime.datetime.now(datetime.UTC).replace(tzinfo=None) - datetime.timedelta(days=9)
    with facade.engine.begin() as conn:
        conn.execute(text('UPDATE inbound_messages SET processed_at = :t'), {'t': old})
        conn.execute(communicator_state.delete().where(
            communicator_state.c.key == 'last_purge_at'))  # "key": a word MariaDB keeps
    monkeypatch.setattr(retention, 'PAGE', 10)
    app = webapp(facade, **{'communicator.apply_seconds': '0.000001'})
    left = [facade.count('inbound_messages')]
    for _ in range(30):
        push(app, [])
        left.append(facade.count('inbound_messages'))
        if 'last_purge_at' in states(facade):
            break
    assert left[0] == 35 and left[-1] == 0
    assert all(a - b <= 10 for a, b in zip(left, left[1:], strict=False))  # a page per request
    assert len(left) > 4  # in slices, not at once
    assert 'purge_resume' not in states(facade)
    with facade.session() as session:
        assert queues.purged_watermark(session, 'central') == 35


def test_pcommunicate_purge_still_purges_everything(make_side, monkeypatch):
    facade = make_side('facade')
    backlog(facade, 1, 35)
    with facade.engine.begin() as conn:
        conn.execute(text('UPDATE inbound_messages SET processed_at = created_at'))
    monkeypatch.setattr(retention, 'PAGE', 10)
    result = purge(facade, -1)
    assert result.finished and result.inbound == 35
    assert facade.count('inbound_messages') == 0


# -- tombstones ------------------------------------------------------------------

def tombstone_rows(side: Side) -> list[dict[str, Any]]:
    return [row for row in side.rows('communicator_mappings') if row['local_id'] is None]


def created_and_deleted(app, first_id: int, original_id: int, name: str,
                        deleted_at: int) -> None:
    """Central creates a tag a day before ``deleted_at`` and deletes it then."""
    push(app, [tag(first_id, original_id, name, deleted_at - DAY)])
    push(app, [tag(first_id + 1, original_id, name, deleted_at, deleted=True)])


def test_tombstones_are_purged_after_retention_and_kept_before(webapp, make_side):
    facade = make_side('facade')
    app = webapp(facade)
    old = now_hlc() - 10 * DAY
    created_and_deleted(app, 1, 1, 'old', old)
    created_and_deleted(app, 3, 2, 'recent', now_hlc() - 2 * DAY)
    assert facade.count('tags') == 0
    assert len(tombstone_rows(facade)) == 2
    assert facade.count('communicator_natural_tombstones') == 2

    result = purge(facade, 7)
    assert (result.tombstones, result.natural_tombstones) == (1, 1)
    [kept] = tombstone_rows(facade)
    assert kept['original_id'] == 2
    [natural] = facade.rows('communicator_natural_tombstones')
    assert json.loads(natural['version'])['deleted'][0] > old
    with facade.session() as session:  # the latest delete forgotten
        assert tombstones.purged_before(session) == old


def test_a_delete_of_ours_is_kept_until_the_peer_has_it(webapp, make_side):
    facade = make_side('facade')
    from pyramid_communicator.demo.models import Tag
    with facade.session() as session:
        session.add(Tag(name='ours', label='x'))
    with facade.session() as session:
        session.delete(session.query(Tag).one())
    assert len(tombstone_rows(facade)) == 1
    assert facade.count('outbound_messages', 'delivered_at IS NULL') == 2

    # However old (a cut-off in the future), not while undelivered.
    result = purge(facade, -1)
    assert (result.tombstones, result.natural_tombstones) == (0, 0)
    assert len(tombstone_rows(facade)) == 1
    with facade.engine.begin() as conn:
        conn.execute(text('UPDATE outbound_messages SET delivered_at = created_at'))
    result = purge(facade, -1)
    assert (result.tombstones, result.natural_tombstones) == (1, 1)
    assert tombstone_rows(facade) == []


def test_a_tombstone_an_unapplied_message_addresses_is_kept(webapp, make_side):
    facade = make_side('facade')
    app = webapp(facade)
    created_and_deleted(app, 1, 1, 'old', now_hlc() - 10 * DAY)
    # A late update of the deleted tag, stored but not applied yet.
    messages = wire.parse_messages(json.dumps([tag(3, 1, 'old', now_hlc() - 9 * DAY)]))
    with facade.session() as session:
        queues.store_inbound(session, 'central', messages)
    assert purge(facade, 7).tombstones == 0
    assert len(tombstone_rows(facade)) == 1


# -- a replay after the purge -------------------------------------------------------

def test_a_replay_after_the_purge_does_not_bring_the_record_back(webapp, make_side):
    facade = make_side('facade')
    app = webapp(facade)
    deleted_at = now_hlc() - 10 * DAY
    created_and_deleted(app, 1, 1, 'gone', deleted_at)
    with facade.engine.begin() as conn:  # applied as long ago
        conn.execute(text('UPDATE inbound_messages SET processed_at = :t'),
                     {'t': datetime.datetime(1970, 1, 1)
                      + datetime.timedelta(microseconds=deleted_at)})
    result = purge(facade, 7)
    assert (result.inbound, result.tombstones, result.natural_tombstones) == (2, 1, 1)
    assert tombstone_rows(facade) == [] and facade.count('inbound_messages') == 0

    # The same messages sent again: at or below the watermark, not stored.
    push(app, [tag(1, 1, 'gone', deleted_at - DAY)])
    assert facade.count('inbound_messages') == 0 and facade.count('tags') == 0

    # A late update under a new id, made before the delete was seen (its
    # version does not cover the delete): refused, not created again.
    push(app, [tag(3, 1, 'gone', deleted_at - DAY // 2, label='late')])
    [late] = facade.rows('inbound_messages')
    assert late['refused_at'] is not None
    assert 'older than deletes forgotten here' in late['last_error']
    assert facade.count('tags') == 0

    # A record new to the facade (fresh version) is created as ever, under
    # another identity or under the name of the one deleted.
    push(app, [tag(4, 2, 'new'), tag(5, 3, 'gone', label='again')])
    assert sorted(row['name'] for row in facade.rows('tags')) == ['gone', 'new']
