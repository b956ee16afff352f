"""Model-level behaviour: what ``publish``, ``receives_from`` and
``autopublish`` put in the outbound queue, and what applying inbound
messages does to the host's tables.

Everything runs on real databases (``--db``) through the conftest sides;
messages reach a side the way the sync engine stores them
(``queues.store_inbound``) and are applied the way the server and
``pcommunicate`` apply them (``sync.apply_inbound``).
"""
from __future__ import annotations

import dataclasses
import datetime
import decimal
import json
import threading
import types
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pytest
import transaction
import zope.sqlalchemy
from sqlalchemy import Date, DateTime, Integer, MetaData, Numeric, String, delete, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from pyramid_communicator import publish, receives_from
from pyramid_communicator.demo.models import Comment, Post
from pyramid_communicator.inbox import ApplyResult
from pyramid_communicator.models import NAMING_CONVENTION, OutboundMessage
from pyramid_communicator.queues import store_inbound
from pyramid_communicator.settings import CommunicatorSettings, parse_settings
from pyramid_communicator.status import give_up, revive
from pyramid_communicator.sync import apply_inbound
from pyramid_communicator.wire import WireMessage, outbound_to_wire, parse_messages

if TYPE_CHECKING:
    from conftest import Side


# -- test-only models, on a Base of their own --------------------------------

class RecordsBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


@receives_from('records_gadget')
class RecordsGadget(RecordsBase):
    """Column types whose wire form is not their Python form."""
    __tablename__ = 'records_gadgets'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str | None] = mapped_column(String(50))
    day: Mapped[datetime.date | None] = mapped_column(Date)
    at: Mapped[datetime.datetime | None] = mapped_column(DateTime)
    price: Mapped[decimal.Decimal | None] = mapped_column(Numeric(10, 2))


@receives_from('records_widget', only=['a'])
class RecordsWidget(RecordsBase):
    """An allow-list: only ``a`` may cross the wire."""
    __tablename__ = 'records_widgets'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    a: Mapped[str | None] = mapped_column(String(50))
    b: Mapped[str | None] = mapped_column(String(50))


# -- fixtures and helpers -----------------------------------------------------

def with_test_tables(side: Side) -> Iterator[Side]:
    """The test-only models live outside the demo's metadata, so the
    conftest reset neither creates nor drops them."""
    RecordsBase.metadata.create_all(side.engine)
    yield side
    side.engine.dispose()  # no pooled connection may hold a lock on them
    RecordsBase.metadata.drop_all(side.engine)


@pytest.fixture
def facade(make_side) -> Iterator[Side]:
    yield from with_test_tables(make_side('facade'))


@pytest.fixture
def central(make_side) -> Iterator[Side]:
    yield from with_test_tables(make_side('central'))


def settings_of(side: Side) -> CommunicatorSettings:
    # A small batch so that the larger tests apply across several batches.
    return parse_settings({'communicator.name': side.name,
                           'communicator.username': 'user',
                           'communicator.password': 'secret',
                           'communicator.batch_size': '7',
                           'communicator.retry_delay': '0',
                           # the messages here are the gem's: no versions
                           'communicator.gem_peer': 'true'})


def message(remote_id: int, name: str, attributes: dict[str, Any],
            origin: str | None = 'central', original_id: int | None = None) -> WireMessage:
    return WireMessage(remote_id, json.dumps({name: attributes}), origin, original_id)


def deliver(side: Side, *messages: WireMessage, sender: str = 'http://peer') -> None:
    """Store messages as a pull or a POST stores them: not yet applied."""
    with side.session() as session:
        store_inbound(session, sender, messages)


def apply(side: Side) -> ApplyResult:
    return apply_inbound(side.engine, settings_of(side))


def with_tables(side: Side, *bases: type[DeclarativeBase]) -> Iterator[Side]:
    """A fixture's body: ``side`` with the tables of test-local models
    (``bases``), dropped after the test."""
    for base in bases:
        base.metadata.create_all(side.engine)
    yield side
    side.engine.dispose()
    for base in bases:
        base.metadata.drop_all(side.engine)


def sync(source: Side, target: Side) -> None:
    """``source``'s queue carried to ``target`` and applied there."""
    forward(source, target)
    apply(target)


def forward(source: Side, target: Side) -> None:
    """Carry every outbound message of ``source`` into ``target``'s inbound
    queue exactly as the wire would (origin filled in by the sender)."""
    rows = [types.SimpleNamespace(**row) for row in source.rows('outbound_messages')]
    deliver(target, *(outbound_to_wire(row, source.name) for row in rows),
            sender=source.name)
    with source.engine.begin() as conn:  # and the sender learns it (2xx)
        conn.execute(OutboundMessage.__table__.update().values(
            delivered_at=datetime.datetime(2000, 1, 1))
            .where(OutboundMessage.__table__.c.delivered_at.is_(None)))


def outbound_bodies(side: Side) -> list[dict[str, Any]]:
    return [json.loads(row['body']) for row in side.rows('outbound_messages')]


def inbound(side: Side) -> dict[int, dict[str, Any]]:
    """Inbound rows by the sender's message id."""
    return {row['remote_id']: row for row in side.rows('inbound_messages')}


def add_post(side: Side, **fields: Any) -> int:
    with side.session() as session:
        post = Post(**fields)
        session.add(post)
        session.flush()
        return post.id


def get_post(side: Side, post_id: int) -> dict[str, Any]:
    [row] = [row for row in side.rows('posts') if row['id'] == post_id]
    return row


def mapped_id(side: Side, name: str, origin: str, original_id: int) -> int | None:
    rows = [row['local_id'] for row in side.rows('communicator_mappings')
            if (row['name'], row['origin'], row['original_id']) == (name, origin, original_id)]
    return rows[0] if rows else None


# -- publish --------------------------------------------------------------------

def test_publish_returns_message_with_column_values_without_primary_key(facade):
    with facade.session() as session:
        post = Post(title='Hello', body='World', slug='hello',
                    published_on=datetime.datetime(2024, 2, 29, 13, 14, 15, 123456))
        session.add(post)
        session.flush()
        post_id = post.id
        returned = publish(session, post)
        assert isinstance(returned, OutboundMessage)
        assert returned.origin is None
        assert returned.original_id == post_id
        assert json.loads(returned.body) == {'post': {
            'title': 'Hello', 'body': 'World', 'slug': 'hello',
            'published_on': '2024-02-29T13:14:15.123456'}}

    [row] = facade.rows('outbound_messages')
    assert json.loads(row['body'])['post']['title'] == 'Hello'
    assert row['origin'] is None and row['original_id'] == post_id
    assert row['delivered_at'] is None
    # NULL origin means "this app": the wire names it.
    on_wire = outbound_to_wire(types.SimpleNamespace(**row), 'facade')
    assert (on_wire.origin, on_wire.original_id) == ('facade', post_id)


def test_publish_serialises_dates_and_decimals_and_they_arrive_intact(central, facade):
    with central.session() as session:
        gadget = RecordsGadget(name='g', day=datetime.date(2024, 2, 29),
                               at=datetime.datetime(2024, 2, 29, 23, 59, 58),
                               price=decimal.Decimal('12.50'))
        session.add(gadget)
        session.flush()
        publish(session, gadget)

    assert outbound_bodies(central) == [{'records_gadget': {
        'name': 'g', 'day': '2024-02-29', 'at': '2024-02-29T23:59:58', 'price': '12.50'}}]

    forward(central, facade)
    assert apply(facade).applied == 1
    with facade.session() as session:  # typed values: SQLite's raw rows are text
        [copy] = session.scalars(select(RecordsGadget)).all()
        assert (copy.name, copy.day, copy.at, copy.price) == (
            'g', datetime.date(2024, 2, 29), datetime.datetime(2024, 2, 29, 23, 59, 58),
            decimal.Decimal('12.50'))


class Aborted(Exception):
    pass


def test_publish_is_gone_when_the_block_raises(facade):
    with pytest.raises(Aborted):
        with facade.session() as session:
            post = Post(title='doomed')
            session.add(post)
            session.add(Comment(body='autopublished, then doomed'))
            session.flush()
            publish(session, post)
            session.flush()
            raise Aborted

    assert facade.count('posts') == 0
    assert facade.count('comments') == 0
    assert facade.count('outbound_messages') == 0


def test_publish_is_gone_when_the_transaction_manager_aborts(facade):
    tm = transaction.TransactionManager(explicit=True)
    session = Session(bind=facade.engine)
    zope.sqlalchemy.register(session, transaction_manager=tm)
    tm.begin()
    post = Post(title='doomed')
    session.add(post)
    session.flush()
    publish(session, post)
    session.flush()
    tm.abort()
    session.close()

    assert facade.count('posts') == 0
    assert facade.count('outbound_messages') == 0


def test_excluded_comment_title_is_never_published(facade):
    with facade.session() as session:
        comment = Comment(title='secret title', body='text')
        session.add(comment)
        session.flush()
        publish(session, comment)

    bodies = outbound_bodies(facade)
    assert len(bodies) == 2  # autopublish on insert, then the explicit publish
    for body in bodies:
        assert body == {'comment': {'post_id': None, 'body': 'text'}}
    assert all('secret title' not in row['body'] for row in facade.rows('outbound_messages'))


def test_only_sends_just_the_allowed_attributes(facade):
    with facade.session() as session:
        widget = RecordsWidget(a='sent', b='kept home')
        session.add(widget)
        session.flush()
        publish(session, widget)

    assert outbound_bodies(facade) == [{'records_widget': {'a': 'sent'}}]


def test_excluded_and_unlisted_attributes_are_not_assigned_when_received(facade):
    deliver(facade,
            message(1, 'comment', {'title': 'not for us', 'body': 'hello'}, 'central', 3),
            message(2, 'records_widget', {'a': 'yes', 'b': 'no'}, 'central', 4))

    assert apply(facade).applied == 2
    [comment] = facade.rows('comments')
    assert (comment['title'], comment['body']) == (None, 'hello')
    [widget] = facade.rows('records_widgets')
    assert (widget['a'], widget['b']) == ('yes', None)


def test_unflushed_publish_has_no_identity_and_creates_a_record_of_its_own(central, facade):
    for title in ('one', 'two'):
        add_post(facade, title=title)
    with central.session() as session:
        post = Post(title='unsaved', body='b')
        session.add(post)
        returned = publish(session, post)  # before any flush
        assert (returned.origin, returned.original_id) == (None, None)

    [row] = central.rows('outbound_messages')
    assert (row['origin'], row['original_id']) == (None, None)

    forward(central, facade)
    [wired] = facade.rows('inbound_messages')
    assert (wired['origin'], wired['original_id']) == (None, None)
    assert apply(facade).applied == 1
    titles = {post['id']: post['title'] for post in facade.rows('posts')}
    assert titles == {1: 'one', 2: 'two', 3: 'unsaved'}
    assert facade.count('communicator_mappings', "origin <> ''") == 0


# -- autopublish ----------------------------------------------------------------

def test_autopublish_publishes_each_flushed_insert_and_update(facade):
    with facade.session() as session:
        comment = Comment(title='t', body='first')
        session.add(comment)
    comment_id = facade.rows('comments')[0]['id']
    assert facade.rows('outbound_messages')[0]['original_id'] == comment_id

    with facade.session() as session:
        session.get(Comment, comment_id).body = 'second'
        session.flush()
        session.get(Comment, comment_id).body = 'third'  # a second flush, a second update

    rows = facade.rows('outbound_messages')
    assert [json.loads(row['body'])['comment']['body'] for row in rows] == [
        'first', 'second', 'third']
    assert {(row['origin'], row['original_id']) for row in rows} == {(None, comment_id)}


def test_autopublished_insert_and_update_arrive_as_one_record(facade, central):
    """The insert's message must carry the new id, or the peer cannot tie
    the later update to the record it created and makes a second one."""
    with facade.session() as session:
        comment = Comment(body='first')
        session.add(comment)
        session.flush()
        comment.body = 'second'

    forward(facade, central)
    assert apply(central).applied == 2
    assert [row['body'] for row in central.rows('comments')] == ['second']
    assert central.count('communicator_mappings', "origin <> ''") == 1


def test_autopublish_skips_updates_that_change_nothing_that_crosses(facade):
    with facade.session() as session:
        session.add(Comment(title='t', body='same'))
    comment_id = facade.rows('comments')[0]['id']

    with facade.session() as session:
        comment = session.get(Comment, comment_id)
        comment.body = 'same'
        session.flush()
        comment.title = 'only the excluded title changes'

    assert facade.rows('comments')[0]['title'] == 'only the excluded title changes'
    assert facade.count('outbound_messages') == 1  # the insert's


def test_changes_applied_from_inbound_messages_are_not_echoed(facade):
    with facade.session() as session:
        session.add(Comment(body='local'))
    local_id = facade.rows('comments')[0]['id']
    assert facade.count('outbound_messages') == 1

    deliver(facade,
            message(1, 'comment', {'body': 'created remotely'}, 'central', 5),
            message(2, 'comment', {'body': 'updated remotely'}, 'facade', local_id))
    assert apply(facade).applied == 2

    assert {row['body'] for row in facade.rows('comments')} == {
        'created remotely', 'updated remotely'}
    assert facade.count('outbound_messages') == 1


# -- mapping ----------------------------------------------------------------------

def test_message_from_elsewhere_creates_a_mapped_record_and_then_updates_it(facade):
    add_post(facade, title='already here')
    deliver(facade, message(1, 'post', {'title': 'From central', 'body': 'b'}, 'central', 7))
    assert apply(facade).applied == 1

    local_id = mapped_id(facade, 'post', 'central', 7)
    assert local_id is not None and local_id != 7
    [mapping] = [m for m in facade.rows('communicator_mappings') if m['origin']]
    assert (mapping['name'], mapping['origin'], mapping['original_id'],
            mapping['local_id']) == ('post', 'central', 7, local_id)
    assert get_post(facade, local_id)['title'] == 'From central'

    deliver(facade, message(2, 'post', {'title': 'Edited on central'}, 'central', 7))
    assert apply(facade).applied == 1
    assert facade.count('posts') == 2
    assert facade.count('communicator_mappings', "origin <> ''") == 1
    edited = get_post(facade, local_id)
    assert (edited['title'], edited['body']) == ('Edited on central', 'b')


def test_what_arrived_is_applied_as_stored(facade):
    """The server and ``pcommunicate`` apply a batch they just stored with
    its messages as parsed on arrival; a re-send under a stored id with
    another body is not stored, and so not what is applied either."""
    [first] = parse_messages(json.dumps([
        {'id': 1, 'origin': 'central', 'original_id': 7,
         'body': json.dumps({'post': {'title': 'first'}})}]))
    [again] = parse_messages(json.dumps([
        {'id': 1, 'origin': 'central', 'original_id': 7,
         'body': json.dumps({'post': {'title': 'sent again, changed'}})}]))
    with facade.session() as session:
        assert store_inbound(session, 'central', [first]) == [first]
    with facade.session() as session:
        assert store_inbound(session, 'central', [again]) == []

    result = apply_inbound(facade.engine, settings_of(facade), known={('central', 1): again})

    assert result.applied == 1
    assert get_post(facade, mapped_id(facade, 'post', 'central', 7))['title'] == 'first'


def test_message_with_own_origin_updates_the_record_with_that_primary_key(facade):
    first = add_post(facade, title='first')
    second = add_post(facade, title='second')
    with facade.session() as session:  # sent to the peer, which may now address it
        publish(session, session.get(Post, second))
    deliver(facade, message(1, 'post', {'title': 'second, edited'}, 'facade', second))

    assert apply(facade).applied == 1
    assert {row['id']: row['title'] for row in facade.rows('posts')} == {
        first: 'first', second: 'second, edited'}
    assert facade.count('communicator_mappings', "origin <> ''") == 0


def test_publishing_a_received_record_carries_its_original_identity(facade):
    add_post(facade, title='already here')
    deliver(facade,
            message(1, 'post', {'title': 'From central'}, 'central', 7),
            message(2, 'comment', {'body': 'remote comment'}, 'central', 11))
    assert apply(facade).applied == 2
    post_id = mapped_id(facade, 'post', 'central', 7)
    comment_id = mapped_id(facade, 'comment', 'central', 11)

    with facade.session() as session:
        post = session.get(Post, post_id)
        post.title = 'Edited on the facade'
        session.flush()
        returned = publish(session, post)
        assert (returned.origin, returned.original_id) == ('central', 7)
        session.get(Comment, comment_id).body = 'edited here'  # autopublished

    rows = facade.rows('outbound_messages')
    assert [(row['origin'], row['original_id']) for row in rows] == [
        ('central', 7), ('central', 11)]
    assert [outbound_to_wire(types.SimpleNamespace(**row), 'facade').origin
            for row in rows] == ['central', 'central']


def test_round_trip_updates_the_original_record(central, facade):
    """central -> facade creates a mapped copy; the facade's edit comes back
    addressed to central's own id and updates that record, not a new one."""
    post_id = add_post(central, title='Original', slug='original')
    with central.session() as session:
        publish(session, session.get(Post, post_id))
    forward(central, facade)
    assert apply(facade).applied == 1

    copy_id = mapped_id(facade, 'post', 'central', post_id)
    with facade.session() as session:
        copy = session.get(Post, copy_id)
        copy.title = 'Edited on the facade'
        publish(session, copy)
    forward(facade, central)
    assert apply(central).applied == 1

    assert [(row['id'], row['title'], row['slug']) for row in central.rows('posts')] == [
        (post_id, 'Edited on the facade', 'original')]
    assert central.count('communicator_mappings', "origin <> ''") == 0


def test_unknown_attributes_are_skipped_and_the_primary_key_never_assigned(facade):
    existing = add_post(facade, title='existing')
    deliver(facade,
            message(1, 'post', {'id': 999, 'title': 'New', 'colour': 'red'}, 'central', 7),
            message(2, 'post', {'id': existing, 'title': 'Newer', 'colour': 'blue'},
                    'central', 7))

    assert apply(facade).applied == 2
    local_id = mapped_id(facade, 'post', 'central', 7)
    assert local_id not in (999, existing)
    assert {row['id']: row['title'] for row in facade.rows('posts')} == {
        existing: 'existing', local_id: 'Newer'}


# -- failures ----------------------------------------------------------------------

FAILURES = {
    # kind: (record name, failing attributes, what last_error mentions)
    'unknown record': ('records_nosuch', {'title': 'x'}, 'UnknownRecord'),
    'constraint': ('post', {'title': 'Clash', 'slug': 'taken'}, 'IntegrityError'),
    'validator': ('post', {'title': ''}, 'a post needs a title'),
}


@pytest.mark.parametrize('kind', list(FAILURES))
def test_failed_message_is_kept_retried_and_blocks_only_its_record(facade, kind):
    name, attributes, error = FAILURES[kind]
    add_post(facade, title='Holds the slug', slug='taken')
    deliver(facade,
            message(1, name, attributes, 'central', 7),
            message(2, name, {'title': 'Waits behind #1'}, 'central', 7),
            message(3, 'post', {'title': 'Another record'}, 'central', 8))

    result = apply(facade)
    assert (result.applied, result.failed, result.waiting) == (1, 1, 1)
    rows = inbound(facade)
    failed, waiting, other = rows[1], rows[2], rows[3]
    assert failed['processed_at'] is None
    assert failed['attempts'] == 1
    assert error in failed['last_error']
    assert failed['failed_at'] is not None
    assert (waiting['processed_at'], waiting['attempts'], waiting['last_error']) == (None, 0, None)
    assert other['processed_at'] is not None
    assert sorted(row['title'] for row in facade.rows('posts')) == [
        'Another record', 'Holds the slug']
    assert mapped_id(facade, name, 'central', 7) is None  # the failure left nothing behind

    result = apply(facade)
    assert (result.applied, result.failed, result.waiting) == (0, 1, 1)
    rows = inbound(facade)
    assert rows[1]['attempts'] == 2 and rows[1]['processed_at'] is None
    assert error in rows[1]['last_error']
    assert (rows[2]['processed_at'], rows[2]['attempts']) == (None, 0)
    assert facade.count('inbound_messages') == 3
    assert facade.count('posts') == 2


def test_a_recent_failure_waits_for_retry_delay_and_still_holds_back_its_record(facade):
    add_post(facade, title='Holds the slug', slug='taken')
    deliver(facade,
            message(1, 'post', {'title': 'Conflicts', 'slug': 'taken'}, 'central', 7),
            message(2, 'post', {'title': 'Waits behind #1'}, 'central', 7))
    delayed = dataclasses.replace(settings_of(facade), retry_delay=3600)
    assert apply_inbound(facade.engine, delayed).failed == 1

    result = apply_inbound(facade.engine, delayed)  # within the hour: not tried again
    assert (result.applied, result.failed, result.waiting) == (0, 0, 2)
    assert [row['attempts'] for row in inbound(facade).values()] == [1, 0]

    result = apply_inbound(facade.engine, delayed, retry_now=True)  # pcommunicate --retry
    assert (result.applied, result.failed, result.waiting) == (0, 1, 1)
    assert [row['attempts'] for row in inbound(facade).values()] == [2, 0]


def test_a_batch_claims_exactly_its_ready_messages_around_held_back_ones(facade):
    """Ready messages with held-back ones between them (ids with gaps):
    the batch claims and applies the ready ones and never touches the
    others, which keep their place behind the failure."""
    add_post(facade, title='Holds the slug', slug='taken')
    delayed = dataclasses.replace(settings_of(facade), retry_delay=3600)
    deliver(facade, message(1, 'post', {'title': 'Conflicts', 'slug': 'taken'}, 'central', 7))
    assert apply_inbound(facade.engine, delayed).failed == 1
    deliver(facade,
            message(2, 'post', {'title': 'Ready A'}, 'central', 8),
            message(3, 'post', {'title': 'Waits behind #1'}, 'central', 7),
            message(4, 'post', {'title': 'Ready B'}, 'central', 9),
            message(5, 'post', {'title': 'Waits too'}, 'central', 7),
            message(6, 'post', {'title': 'Ready C'}, 'central', 10))

    result = apply_inbound(facade.engine, delayed)
    assert (result.applied, result.failed, result.waiting) == (3, 0, 3)
    rows = inbound(facade)
    assert [rows[i]['processed_at'] is not None for i in range(1, 7)] == [
        False, True, False, True, False, True]
    assert [rows[i]['attempts'] for i in range(1, 7)] == [1, 1, 0, 1, 0, 1]
    assert sorted(row['title'] for row in facade.rows('posts')) == [
        'Holds the slug', 'Ready A', 'Ready B', 'Ready C']


def test_after_the_cause_is_fixed_the_failed_then_the_waiting_message_apply_in_order(facade):
    blocker = add_post(facade, title='Holds the slug', slug='taken')
    deliver(facade,
            message(1, 'post', {'title': 'First', 'slug': 'taken'}, 'central', 7),
            message(2, 'post', {'title': 'Second'}, 'central', 7))
    assert apply(facade).failed == 1
    assert apply(facade).failed == 1

    with facade.session() as session:
        session.execute(delete(Post).where(Post.id == blocker))

    result = apply(facade)
    assert (result.applied, result.failed, result.waiting) == (2, 0, 0)
    # Applied in order: the create's slug stays, the later update's title wins.
    [post] = facade.rows('posts')
    assert (post['title'], post['slug']) == ('Second', 'taken')
    assert mapped_id(facade, 'post', 'central', 7) == post['id']
    rows = inbound(facade)
    assert all(row['processed_at'] is not None for row in rows.values())
    assert [rows[1]['attempts'], rows[2]['attempts']] == [3, 1]
    assert (rows[1]['last_error'], rows[1]['failed_at']) == (None, None)
    assert apply(facade) == ApplyResult()


def test_given_up_message_is_not_retried_unblocks_its_record_and_can_be_revived(facade):
    deliver(facade,
            message(1, 'post', {'title': ''}, 'central', 9),
            message(2, 'post', {'title': 'Valid after all'}, 'central', 9))
    assert apply(facade).waiting == 1
    failed_id = inbound(facade)[1]['id']

    with facade.session() as session:
        assert give_up(session, [failed_id], by='operator', reason='empty title') == 1

    result = apply(facade)
    assert (result.applied, result.failed, result.waiting) == (1, 0, 0)
    [post] = facade.rows('posts')
    assert post['title'] == 'Valid after all'
    given_up = inbound(facade)[1]
    assert given_up['attempts'] == 1 and given_up['processed_at'] is None
    assert given_up['given_up_at'] is not None
    assert (given_up['given_up_by'], given_up['given_up_reason']) == ('operator', 'empty title')
    assert apply(facade) == ApplyResult()
    assert inbound(facade)[1]['attempts'] == 1

    with facade.session() as session:
        assert revive(session, [failed_id]) == 1
    revived = inbound(facade)[1]
    assert (revived['given_up_at'], revived['given_up_by']) == (None, None)
    assert apply(facade).failed == 1  # still an empty title, but tried again
    assert inbound(facade)[1]['attempts'] == 2
    assert facade.count('inbound_messages') == 2


def test_message_for_a_missing_own_record_is_kept_not_created(facade):
    deliver(facade, message(1, 'post', {'title': 'Gone'}, 'facade', 42))

    assert apply(facade).failed == 1
    assert facade.count('posts') == 0
    row = inbound(facade)[1]
    assert row['processed_at'] is None and 'never sent' in row['last_error']
    assert row['refused_at'] is not None


def test_message_for_a_published_own_record_deleted_behind_our_back_is_kept(facade):
    gone = add_post(facade, title='soon gone')
    with facade.session() as session:
        publish(session, session.get(Post, gone))
    with facade.engine.begin() as conn:  # not through a model with deletes=True
        conn.exec_driver_sql(f'DELETE FROM posts WHERE id = {gone}')
    deliver(facade, message(1, 'post', {'title': 'Gone'}, 'facade', gone))

    assert apply(facade).failed == 1
    assert facade.count('posts') == 0
    row = inbound(facade)[1]
    assert row['processed_at'] is None and 'does not exist' in row['last_error']


# -- concurrency --------------------------------------------------------------------

def test_two_concurrent_apply_runs_never_apply_a_message_twice(facade):
    records = 30
    # Every record is created, then updated: each message must be applied
    # once and in order, whichever run takes it.
    messages = []
    for number in range(1, records + 1):
        messages.append(message(len(messages) + 1, 'post', {'title': f'created {number}'},
                                'central', number))
        messages.append(message(len(messages) + 1, 'post', {'title': f'updated {number}'},
                                'central', number))
    deliver(facade, *messages)

    start = threading.Barrier(2)

    def run() -> ApplyResult:
        start.wait(timeout=30)
        return apply(facade)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = [future.result(timeout=120)
                   for future in [pool.submit(run), pool.submit(run)]]

    assert sum(result.applied for result in results) == len(messages)
    assert sum(result.failed for result in results) == 0
    assert facade.count('posts') == records
    assert facade.count('communicator_mappings', "origin <> ''") == records
    assert sorted(row['title'] for row in facade.rows('posts')) == sorted(
        f'updated {number}' for number in range(1, records + 1))
    rows = facade.rows('inbound_messages')
    assert [row['attempts'] for row in rows] == [1] * len(messages)
    assert all(row['processed_at'] is not None and row['last_error'] is None for row in rows)


def test_a_kept_database_error_leaves_out_the_statement_and_its_values(facade):
    add_post(facade, title='Holds the slug', slug='taken')
    deliver(facade, message(1, 'post', {'title': 'Secret title', 'slug': 'taken'}, 'central', 7))
    assert apply(facade).failed == 1
    [row] = facade.rows('inbound_messages')
    assert row['last_error'].startswith('IntegrityError: ')
    assert 'Secret title' not in row['last_error']
    assert 'INSERT' not in row['last_error'] and '[parameters' not in row['last_error']
