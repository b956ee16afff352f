"""Failed inbound messages back off, and a pile of them costs a run a
bounded amount of work.

The failures are comments on posts that have not arrived ("not here
(yet)"), as in ``test_references.py``.  Time passes by moving a failure's
``failed_at`` into the past, never by sleeping.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import re
from typing import TYPE_CHECKING

import pytest
import transaction
from test_records import deliver, message, settings_of
from test_references import comments, with_refs
from test_views import basic, post_messages
from test_views import message as wire_message

from pyramid_communicator import inbox, queues
from pyramid_communicator.inbox import ApplyResult
from pyramid_communicator.models import utcnow
from pyramid_communicator.retries import Backoff, plan_retries
from pyramid_communicator.settings import CommunicatorSettings
from pyramid_communicator.status import format_status, queue_status
from pyramid_communicator.sync import apply_inbound, make_session

if TYPE_CHECKING:
    from conftest import Side

SENDER = 'central'


@pytest.fixture
def facade(make_side) -> Side:
    return make_side('facade')


def settings(side: Side, **overrides) -> CommunicatorSettings:
    return dataclasses.replace(settings_of(side), **overrides)


def orphan(remote_id: int, comment: int, post: int | None = None, body: str | None = None):
    """A comment from central on central's post ``post`` (default: one
    that never arrives)."""
    return with_refs(message(remote_id, 'comment', {'body': body or f'comment {comment}'},
                             'central', comment),
                     {'post_id': ['central', post or 1000 + comment]})


def post(remote_id: int, original_id: int):
    return message(remote_id, 'post', {'title': f'post {original_id}'}, 'central', original_id)


def attempts(side: Side) -> dict[int, int]:
    """Attempts by the sender's message id."""
    return {row['remote_id']: row['attempts'] for row in side.rows('inbound_messages')}


def failed_ago(side: Side, seconds: float) -> None:
    """As if every failure had happened ``seconds`` ago."""
    at = utcnow() - datetime.timedelta(seconds=seconds)
    with side.engine.begin() as conn:
        conn.execute(queues.inbound_messages.update()
                     .where(queues.IN.failed_at.is_not(None)).values(failed_at=at))


# -- the schedule -------------------------------------------------------------

def test_the_wait_doubles_with_each_failure_up_to_the_cap():
    backoff = Backoff(30, 3600)
    assert [backoff.wait(n) for n in range(1, 10)] == [
        30, 60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert backoff.wait(0) == 30  # attempts of a row older than the column's use
    assert backoff.wait(10_000) == 3600  # no overflow
    assert Backoff(0, 3600).wait(20) == 0  # retry_delay 0: every run
    assert Backoff(30, 10).wait(1) == 10  # the cap wins even over the first wait


def test_the_longest_overdue_go_first_and_the_limit_defers_the_rest():
    now = utcnow()
    backoff = Backoff(10, 1000)

    def row(message_id, attempts, seconds_ago):
        return type('Row', (), {'id': message_id, 'attempts': attempts,
                                'failed_at': now - datetime.timedelta(seconds=seconds_ago)})

    rows = [row(1, 1, 11),   # due 1 s ago
            row(2, 5, 200),  # waits 160 s: due 40 s ago
            row(3, 1, 5),    # not due for 5 s
            row(4, 2, 30),   # waits 20 s: due 10 s ago
            row(5, 9, 900)]  # waits 1000 s: not due
    plan = plan_retries(rows, backoff, now, limit=2)
    assert (plan.chosen, plan.deferred) == ({2, 4}, 1)
    assert plan_retries(rows, backoff, now, limit=None).chosen == {1, 2, 4}


# -- applying -------------------------------------------------------------------

def test_back_off_grows_with_each_failure_and_is_capped(facade):
    backed_off = settings(facade, retry_delay=10, retry_max_delay=25)
    deliver(facade, orphan(1, 7), sender=SENDER)
    assert apply_inbound(facade.engine, backed_off).failed == 1
    # (seconds since the failure, tried?) per wait: 10, 20, then 25 (not 40), 25
    for waited, wait in ((1, 10), (2, 20), (3, 25), (4, 25)):
        failed_ago(facade, wait - 1)
        result = apply_inbound(facade.engine, backed_off)
        assert (result.failed, result.waiting, attempts(facade)[1]) == (0, 1, waited), wait
        failed_ago(facade, wait + 1)
        result = apply_inbound(facade.engine, backed_off)
        assert (result.failed, result.retried, attempts(facade)[1]) == (1, 1, waited + 1), wait


def test_a_failure_that_can_apply_now_is_applied_once_it_is_due(facade):
    backed_off = settings(facade, retry_delay=30)
    deliver(facade, orphan(1, 7, post=42, body='Early'), sender=SENDER)
    assert apply_inbound(facade.engine, backed_off).failed == 1
    deliver(facade, post(2, 42), sender=SENDER)

    result = apply_inbound(facade.engine, backed_off)  # the post; the comment is not due
    assert (result.applied, result.failed, result.waiting) == (1, 0, 1)
    assert comments(facade) == {}

    failed_ago(facade, 31)
    result = apply_inbound(facade.engine, backed_off)
    assert (result.applied, result.failed, result.retried, result.retried_failed) == (
        1, 0, 1, 0)
    [the_post] = facade.rows('posts')
    assert comments(facade) == {'Early': the_post['id']}
    assert [row['processed_at'] is not None for row in facade.rows('inbound_messages')] == [
        True, True]


def test_retry_now_ignores_back_off_and_the_limit(facade):
    """``pcommunicate --retry``, all or by id."""
    backed_off = settings(facade, retry_delay=3600, retry_limit=2)
    deliver(facade, *(orphan(n, n) for n in range(1, 6)), sender=SENDER)
    assert apply_inbound(facade.engine, backed_off).failed == 5
    assert apply_inbound(facade.engine, backed_off).waiting == 5  # none due for an hour

    result = apply_inbound(facade.engine, backed_off, retry_now=True)
    assert (result.failed, result.retried, result.retries_deferred) == (5, 5, 0)
    ids = [row['id'] for row in facade.rows('inbound_messages')]
    result = apply_inbound(facade.engine, backed_off, ids[3:], retry_now=True)
    assert (result.failed, result.retried) == (2, 2)
    assert attempts(facade) == {1: 2, 2: 2, 3: 2, 4: 3, 5: 3}


def test_later_messages_for_the_record_wait_behind_a_failure_not_due(facade):
    backed_off = settings(facade, retry_delay=30)
    deliver(facade, orphan(1, 7, post=42, body='First'), sender=SENDER)
    assert apply_inbound(facade.engine, backed_off).failed == 1
    deliver(facade, post(2, 42), orphan(3, 7, post=42, body='Edited'), sender=SENDER)

    result = apply_inbound(facade.engine, backed_off)
    assert (result.applied, result.failed, result.waiting) == (1, 0, 2)  # the post only
    assert attempts(facade) == {1: 1, 2: 1, 3: 0}
    assert comments(facade) == {}

    failed_ago(facade, 31)
    result = apply_inbound(facade.engine, backed_off)  # the failure, then its update
    assert (result.applied, result.failed, result.waiting) == (2, 0, 0)
    assert list(comments(facade)) == ['Edited']


def test_a_failure_left_over_by_the_limit_still_holds_back_its_record(facade):
    limited = settings(facade, retry_delay=0, retry_limit=1)
    deliver(facade, orphan(1, 7), orphan(2, 8), sender=SENDER)
    assert apply_inbound(facade.engine, limited).failed == 2
    deliver(facade, orphan(3, 7), orphan(4, 8), sender=SENDER)  # updates of both

    result = apply_inbound(facade.engine, limited)
    # One failure tried (and failed again), the other deferred: both
    # records' updates wait.
    assert (result.retried, result.retries_deferred, result.failed, result.waiting) == (
        1, 1, 1, 3)
    assert attempts(facade) == {1: 2, 2: 1, 3: 0, 4: 0}


def test_with_many_failures_a_run_retries_a_bounded_number_oldest_due_first(facade,
                                                                            monkeypatch):
    limited = settings(facade, retry_delay=0, retry_limit=4, batch_size=50)  # one page
    failing = 18
    deliver(facade, *(orphan(n, n) for n in range(1, failing + 1)), sender=SENDER)
    assert apply_inbound(facade.engine, limited).failed == failing
    claims = []
    claim_batch = queues.claim_batch

    def recording(session, message_ids):
        claims.append(list(message_ids))
        return claim_batch(session, message_ids)

    monkeypatch.setattr(queues, 'claim_batch', recording)
    for run in range(5):  # every failure is due at every run: the limit bounds
        fresh = [post(100 + 3 * run + i, 500 + 3 * run + i) for i in range(3)]
        deliver(facade, *fresh, sender=SENDER)
        claims.clear()
        result = apply_inbound(facade.engine, limited)
        assert (result.retried, result.retried_failed, result.retries_deferred) == (
            4, 4, failing - 4)
        assert (result.applied, result.failed, result.waiting) == (3, 4, failing - 4)
        # The retries in a batch of their own (their posts not here: set
        # aside, nothing written); the new posts in one batch, not split
        # for the old failures; the retries again once the rest of the run
        # is applied, and a last time to keep them failed, in one batch.
        new_ids = {row['id'] for row in facade.rows('inbound_messages')
                   if row['remote_id'] >= 100 + 3 * run and row['remote_id'] < 200}
        assert [len(claim) for claim in claims] == [4, 3, 4, 4]
        assert set(claims[1]) == new_ids

    tried = attempts(facade)
    assert sum(tried[n] - 1 for n in range(1, failing + 1)) == 5 * 4
    # Turn by turn: each failure tried once more before any a second time.
    assert set(tried[n] for n in range(1, failing + 1)) == {2, 3}
    assert sum(1 for n in range(1, failing + 1) if tried[n] == 3) == 5 * 4 - failing


def test_applying_as_it_pulls_retries_nothing(facade):
    """A run applies each pulled batch at once without retries: the limit
    is spent once, by the apply that follows the pull."""
    deliver(facade, orphan(1, 7), sender=SENDER)
    assert apply_inbound(facade.engine, settings(facade, retry_delay=0)).failed == 1
    tm = transaction.TransactionManager(explicit=True)
    session = make_session(facade.engine, tm)
    try:
        result = inbox.apply_pending(session, tm, 'facade', 10,
                                     not_retried_since=datetime.datetime.min)
    finally:
        session.close()
    assert result == ApplyResult(waiting=1)
    assert attempts(facade) == {1: 1}


def test_the_server_retries_a_bounded_number_after_each_request(webapp, facade):
    """The server applies after every request of a run: each retries at
    most ``retry_limit`` failures, not the whole pile."""
    app = webapp(facade, **{'communicator.retry_limit': 3})  # retry_delay 0: all due
    hopeless = [wire_message(n, json.dumps({'no_such_model': {'n': n}}), 'central', n)
                for n in range(1, 11)]
    post_messages(app, hopeless, headers={**basic(), 'X-Communicator-Name': 'central'})
    assert attempts(facade) == {n: 1 for n in range(1, 11)}  # each tried once on arrival

    for request in range(1, 5):
        app.get('/messages.json?from_id=0', headers={**basic(), 'Accept': 'application/json'})
        assert sum(attempts(facade).values()) == 10 + 3 * request
    assert set(attempts(facade).values()) == {2, 3}  # in turn: none a third time before


# -- status -----------------------------------------------------------------------

def test_status_says_when_a_failure_is_tried_next(facade):
    backed_off = settings(facade, retry_delay=30, retry_max_delay=3600)
    deliver(facade, orphan(1, 7), sender=SENDER)
    assert apply_inbound(facade.engine, backed_off).failed == 1
    for _ in range(2):  # the third attempt: waits 30 * 2 ** 2 s
        failed_ago(facade, 3600)
        assert apply_inbound(facade.engine, backed_off).failed == 1
    failed_ago(facade, 20)

    with facade.session() as session:
        status = queue_status(session, 'facade', backoff=Backoff.of(backed_off))
        unknown = queue_status(session, 'facade')
    [failure] = status['failures']
    assert failure['attempts'] == 3
    due = datetime.datetime.fromisoformat(failure['next_attempt_at'].removesuffix('Z'))
    failed = datetime.datetime.fromisoformat(failure['failed_at'].removesuffix('Z'))
    assert due - failed == datetime.timedelta(seconds=120)
    assert unknown['failures'][0]['next_attempt_at'] is None  # additive: null when unknown
    assert re.search(r', 3 attempts, next attempt in (99|100)s\): LookupError',
                     format_status(status))

    failed_ago(facade, 121)
    with facade.session() as session:
        status = queue_status(session, 'facade', backoff=Backoff.of(backed_off))
    assert ', 3 attempts, next attempt due now): LookupError' in format_status(status)
    assert 'next attempt' not in format_status(unknown)
