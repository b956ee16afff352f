"""Records of any primary key (docs/models.rst, Primary keys): a UUID, a
string, an integer the app chooses and a composite key keep their value
on both sides after a real sync, in both directions, through create,
update and delete; the same key created on both sides meets as one
record; verify compares them; and a hostile peer cannot reach an
unshared record by naming its key.

Messages travel as the wire carries them (``forward``) and are applied
as the server and ``pcommunicate`` apply them (``apply``).
"""
from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import ForeignKey, Integer, MetaData, String, Uuid, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from test_records import apply, deliver, forward, sync, with_tables

from pyramid_communicator import publish, publish_delete, receives_from
from pyramid_communicator.keys import handle_of
from pyramid_communicator.models import NAMING_CONVENTION
from pyramid_communicator.records import receiver_of
from pyramid_communicator.verify import Verifier, answer, parse_request
from pyramid_communicator.versions import now_hlc
from pyramid_communicator.wire import WireMessage

if TYPE_CHECKING:
    from conftest import Side


class KeysBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


@receives_from('keys_note', deletes=True)
class Note(KeysBase):
    """A UUID key, made by the app (``default``) before the insert."""
    __tablename__ = 'keys_notes'
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    title: Mapped[str | None] = mapped_column(String(50))


@receives_from('keys_currency', deletes=True)
class Currency(KeysBase):
    """A natural string key."""
    __tablename__ = 'keys_currencies'
    code: Mapped[str] = mapped_column(String(3), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(50))


@receives_from('keys_ticket', autopublish=True)
class Ticket(KeysBase):
    """An integer key the app chooses (never handed out by the database)."""
    __tablename__ = 'keys_tickets'
    number: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    subject: Mapped[str | None] = mapped_column(String(50))


@receives_from('keys_order')
class Order(KeysBase):
    """A surrogate key: ids differ per side, mapped as ever."""
    __tablename__ = 'keys_orders'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str | None] = mapped_column(String(50))


@receives_from('keys_line', autopublish=True, deletes=True)
class Line(KeysBase):
    """A composite key: the order (a foreign key to a synced model, mapped)
    and the line's position in it (kept as it is)."""
    __tablename__ = 'keys_lines'
    order_id: Mapped[int] = mapped_column(ForeignKey('keys_orders.id'), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    text: Mapped[str | None] = mapped_column(String(50))


@pytest.fixture
def central(make_side) -> Iterator[Side]:
    yield from with_tables(make_side('central'), KeysBase)


@pytest.fixture
def facade(make_side) -> Iterator[Side]:
    yield from with_tables(make_side('facade'), KeysBase)



def rows(side: Side, cls: type) -> list[dict[str, Any]]:
    """The model's records as the side's user sees them, by key."""
    with side.session() as session:
        found = session.scalars(select(cls)).all()
        columns = [c.key for c in cls.__mapper__.column_attrs]
        return [{key: getattr(r, key) for key in columns}
                for r in sorted(found, key=cls.__mapper__.primary_key_from_instance)]


def edit(side: Side, cls: type, key: Any, **values: Any) -> None:
    with side.session() as session:
        record = session.get(cls, key)
        for attribute, value in values.items():
            setattr(record, attribute, value)
        session.flush()
        publish(session, record)


def remove(side: Side, cls: type, key: Any) -> None:
    with side.session() as session:
        record = session.get(cls, key)
        publish_delete(session, record)
        session.delete(record)


def failures(side: Side) -> list[str]:
    return [row['last_error'] for row in side.rows('inbound_messages')
            if row['last_error'] or row['refused_at']]


# -- each kind of key, both ways ---------------------------------------------------

def test_a_uuid_record_keeps_its_key_through_create_update_delete_both_ways(central,
                                                                             facade):
    with central.session() as session:
        note = Note(title='from central')
        session.add(note)
        session.flush()
        publish(session, note)
        key = note.id
    sync(central, facade)
    assert rows(facade, Note) == [{'id': key, 'title': 'from central'}]

    edit(facade, Note, key, title='edited on the facade')
    sync(facade, central)
    assert rows(central, Note) == [{'id': key, 'title': 'edited on the facade'}]

    with facade.session() as session:
        other = Note(title='from the facade')
        session.add(other)
        session.flush()
        publish(session, other)
        other_key = other.id
    sync(facade, central)
    assert {r['id']: r['title'] for r in rows(central, Note)} == {
        key: 'edited on the facade', other_key: 'from the facade'}

    remove(central, Note, other_key)
    remove(facade, Note, key)
    sync(central, facade)
    sync(facade, central)
    assert rows(central, Note) == rows(facade, Note) == []
    assert failures(central) == failures(facade) == []


def test_a_record_whose_key_the_database_has_not_given_yet_cannot_be_published(central):
    with central.session() as session:
        note = Note(title='not flushed')  # its UUID comes with the insert
        session.add(note)
        with pytest.raises(ValueError, match='flush the session before publishing'):
            publish(session, note)
    assert central.count('outbound_messages') == 0


def test_a_string_key_is_the_record_on_both_sides(central, facade):
    with facade.session() as session:
        eur = Currency(code='EUR', name='Euro')
        session.add(eur)
        session.flush()
        publish(session, eur)
    sync(facade, central)
    edit(central, Currency, 'EUR', name='euro')
    sync(central, facade)
    assert rows(central, Currency) == rows(facade, Currency) == [
        {'code': 'EUR', 'name': 'euro'}]
    remove(central, Currency, 'EUR')
    sync(central, facade)
    assert rows(facade, Currency) == []


def test_an_app_chosen_integer_key_arrives_unchanged(central, facade):
    with facade.session() as session:
        session.add(Ticket(number=7, subject="the facade's own seven"))
    with central.session() as session:
        session.add(Ticket(number=1001, subject='ticket 1001'))
    sync(central, facade)
    assert rows(facade, Ticket) == [{'number': 7, 'subject': "the facade's own seven"},
                                    {'number': 1001, 'subject': 'ticket 1001'}]
    edit(facade, Ticket, 1001, subject='answered')
    sync(facade, central)
    assert rows(central, Ticket) == rows(facade, Ticket)


def test_a_composite_key_maps_its_foreign_key_part_and_keeps_the_rest(central, facade):
    with facade.session() as session:  # the facade's ids run ahead of central's
        session.add_all(Order(name=f'local {i}') for i in range(3))
    with central.session() as session:
        order = Order(name='shared')
        session.add(order)
        session.flush()
        publish(session, order)
        session.add_all(Line(order_id=order.id, position=p, text=f'line {p}')
                        for p in (1, 2))
        central_order = order.id
    sync(central, facade)
    facade_order = next(r['id'] for r in rows(facade, Order) if r['name'] == 'shared')
    assert facade_order != central_order
    assert rows(facade, Line) == [
        {'order_id': facade_order, 'position': p, 'text': f'line {p}'} for p in (1, 2)]

    edit(facade, Line, (facade_order, 2), text='changed on the facade')
    with facade.session() as session:
        session.add(Line(order_id=facade_order, position=3, text='added on the facade'))
    sync(facade, central)
    assert rows(central, Line) == [
        {'order_id': central_order, 'position': 1, 'text': 'line 1'},
        {'order_id': central_order, 'position': 2, 'text': 'changed on the facade'},
        {'order_id': central_order, 'position': 3, 'text': 'added on the facade'}]

    with central.session() as session:
        session.delete(session.get(Line, (central_order, 1)))
    sync(central, facade)
    assert [r['position'] for r in rows(facade, Line)] == [2, 3]
    assert failures(central) == failures(facade) == []


def test_the_same_key_created_on_both_sides_meets_as_one_record(central, facade):
    for side, name in ((central, 'US dollar'), (facade, 'dollar')):
        with side.session() as session:
            usd = Currency(code='USD', name=name)
            session.add(usd)
            session.flush()
            publish(session, usd)
    forward(central, facade)
    forward(facade, central)
    apply(central)
    apply(facade)
    assert rows(central, Currency) == rows(facade, Currency)
    assert len(rows(central, Currency)) == 1
    assert rows(central, Currency)[0]['name'] == 'dollar'  # the newer edit
    assert failures(central) == failures(facade) == []


# -- publish-all ---------------------------------------------------------------------

def publish_all(side: Side, name: str) -> int:
    """``pcommunicate --publish-all NAME``'s work, in this process (the
    test models are not the demo app's)."""
    import transaction
    import zope.sqlalchemy
    from sqlalchemy.orm import Session

    from pyramid_communicator.seeding import publish_all as seed
    tm = transaction.TransactionManager(explicit=True)
    session = Session(bind=side.engine)
    zope.sqlalchemy.register(session, transaction_manager=tm)
    try:
        return seed(session, tm, name, batch_size=3)
    finally:
        session.close()


def test_publish_all_sends_keyed_records_in_key_order_batches(central, facade):
    with central.session() as session:  # written before sync was enabled
        session.add_all(Note(title=f'old {i}') for i in range(8))
        session.add_all(Order(name=f'order {i}') for i in range(2))
        session.flush()
        for order in session.scalars(select(Order)):
            session.add_all(Line(order_id=order.id, position=p, text='old') for p in range(4))
    # (the lines were autopublished when written: publish-all sends them again)
    assert [publish_all(central, name) for name in ('keys_note', 'keys_order', 'keys_line')] \
        == [8, 2, 8]
    sync(central, facade)
    apply(facade)  # the lines autopublished before their order was: retried, now applied
    assert [r['id'] for r in rows(facade, Note)] == [r['id'] for r in rows(central, Note)]
    assert [(r['position'], r['text']) for r in rows(facade, Line)] == [
        (p, 'old') for p in range(4)] * 2
    assert not [row for row in facade.rows('inbound_messages') if row['processed_at'] is None]


# -- verify ----------------------------------------------------------------------------

class InProcess:
    """The facade's ``/verify.json``, answered in this process (the test
    models are not the demo app's, which ``pcommunicate`` would load)."""
    verify_bytes_sent = verify_bytes_received = verify_requests = 0
    verify_url = 'in-process'

    def __init__(self, side: Side) -> None:
        self.side = side

    def verify_request(self, request: dict) -> tuple[dict, str]:
        with self.side.session() as session:
            reply = answer(session, self.side.name,
                           parse_request(json.dumps(request).encode()))
        return json.loads(json.dumps(reply)), self.side.name


def test_verify_compares_keyed_records_and_finds_drift(central, facade):
    with central.session() as session:
        notes = [Note(title=f'note {i}') for i in range(40)]
        order = Order(name='shared')
        session.add_all([*notes, order])
        session.flush()
        for record in (*notes, order):
            publish(session, record)
        session.add_all(Line(order_id=order.id, position=p, text='x') for p in range(3))
        session.add_all(Currency(code=c, name=c) for c in ('AUD', 'NZD'))
        session.flush()
        for currency in session.scalars(select(Currency)):
            publish(session, currency)
        drifted = notes[17].id
    sync(central, facade)
    names = ['keys_currency', 'keys_line', 'keys_note', 'keys_order']
    report = Verifier(central.engine, 'central', InProcess(facade)).run(names)
    assert report.differences == []

    with facade.engine.begin() as conn:  # an edit by hand, outside the add-on
        conn.execute(Note.__table__.update().where(Note.__table__.c.id == drifted)
                     .values(title='by hand'))
    report = Verifier(central.engine, 'central', InProcess(facade)).run(names)
    assert [(d.name, d.identity) for d in report.differences] == [
        ('keys_note', ('central', handle_of(json.dumps(str(drifted)))))]


def test_repair_publishes_a_drifted_uuid_record_and_a_lost_delete_again(central, facade):
    """What ``--repair`` does for central's side of the differences, in
    process."""
    from pyramid_communicator.repair import republish
    with central.session() as session:
        notes = [Note(title=f'note {i}') for i in range(3)]
        session.add_all(notes)
        session.flush()
        for note in notes:
            publish(session, note)
        edited, deleted = notes[0].id, notes[1].id
    sync(central, facade)
    with central.engine.begin() as conn:  # an edit by hand, outside the add-on
        conn.execute(Note.__table__.update().where(Note.__table__.c.id == edited)
                     .values(title='fixed by hand'))
    remove(central, Note, deleted)
    with central.engine.begin() as conn:  # and the delete's message is lost
        conn.execute(text('DELETE FROM outbound_messages WHERE delivered_at IS NULL'))
    names = ['keys_note']
    before = Verifier(central.engine, 'central', InProcess(facade)).run(names)
    assert len(before.differences) == 2
    identities = [d.identity for d in before.differences]
    with central.session() as session:  # the edit published again, the delete sent again
        assert republish(session, receiver_of(Note()), identities, 'central') == (2, [])
    sync(central, facade)
    assert rows(facade, Note) == rows(central, Note)
    assert {r['title'] for r in rows(facade, Note)} == {'fixed by hand', 'note 2'}
    assert Verifier(central.engine, 'central', InProcess(facade)).run(names).differences == []


def test_a_peer_that_predates_keyed_records_keeps_them_waiting(central, facade,
                                                               monkeypatch):
    from pyramid_communicator import wire
    with central.session() as session:
        order = Order(name='integer key')
        session.add_all([order, Currency(code='JPY', name='yen')])
        session.flush()
        publish(session, order)
        publish(session, session.get(Currency, 'JPY'))
    with monkeypatch.context() as patch:
        patch.setattr(wire, 'FORMAT_VERSION', 3)  # the facade before this change
        sync(central, facade)
        assert rows(facade, Currency) == []
        assert [r['name'] for r in rows(facade, Order)] == ['integer key']
    apply(facade)  # upgraded: what waited applies
    assert rows(facade, Currency) == [{'code': 'JPY', 'name': 'yen'}]


# -- a hostile peer ----------------------------------------------------------------

def forged(remote_id: int, name: str, attributes: dict[str, Any], origin: str,
           original_id: int, refs: dict | None = None, delete: bool = False) -> WireMessage:
    """A message as a compromised facade would write it: its own fresh
    edit (or delete) of every attribute, under any identity it likes."""
    hlc = now_hlc()
    version = {'clock': {'facade': hlc}}
    if delete:
        version['deleted'] = [hlc, 'facade']
    else:
        version['stamps'] = {key: [hlc, 'facade'] for key in attributes}
    return WireMessage(remote_id, json.dumps({name: attributes}), origin, original_id,
                       refs, version)


def refusals(side: Side) -> list[str]:
    return [row['last_error'] for row in side.rows('inbound_messages') if row['refused_at']]


@pytest.fixture
def private(central) -> dict[str, Any]:
    """Central's records that were never shared: a note, a currency, an
    order with a line."""
    with central.session() as session:
        note = Note(title='private note')
        order = Order(name='private order')
        session.add_all([note, order, Currency(code='CHF', name='private franc')])
        session.flush()
        session.add(Line(order_id=order.id, position=1, text='private line'))
        return {'note': note.id, 'order': order.id}


def central_records(side: Side) -> list:
    return [rows(side, cls) for cls in (Note, Currency, Order, Line)]


@pytest.mark.parametrize('attack', ['create', 'update', 'delete', 'own identity'])
def test_a_forged_uuid_of_an_unshared_record_is_refused(central, private, attack):
    before = central_records(central)
    key = str(private['note'])
    body = {'id': key, 'title': 'taken over'}
    message = {
        'create': forged(1, 'keys_note', body, 'facade', 5),
        'update': forged(1, 'keys_note', body, 'facade', handle_of(json.dumps(key))),
        'delete': forged(1, 'keys_note', {'id': key}, 'facade', 5, delete=True),
        'own identity': forged(1, 'keys_note', body, 'central', handle_of(json.dumps(key))),
    }[attack]
    deliver(central, message, sender='facade')
    apply(central)
    assert central_records(central) == before
    [reason] = refusals(central)
    assert 'never sent to it' in reason


def test_a_forged_string_key_and_a_key_change_are_refused(central, private):
    with central.session() as session:
        shared = Currency(code='GBP', name='pound')
        session.add(shared)
        session.flush()
        publish(session, shared)
    before = central_records(central)
    gbp = handle_of(json.dumps('GBP'))
    deliver(central,
            forged(1, 'keys_currency', {'code': 'CHF', 'name': 'mine'}, 'facade', 9),
            # the shared record's identity, naming the private key: a takeover
            forged(2, 'keys_currency', {'code': 'CHF', 'name': 'mine'}, 'central', gbp),
            forged(3, 'keys_currency', {'code': 'X' * 300, 'name': 'long'}, 'facade', 10),
            forged(4, 'keys_currency', {'name': 'no code'}, 'facade', 11),
            sender='facade')
    apply(central)
    assert central_records(central) == before
    reasons = refusals(central)
    assert len(reasons) == 4
    assert 'matches keys_currency "CHF" of central, which was never sent to it' in reasons[0]
    assert 'keys never change' in reasons[1]
    assert 'longer than 255' in reasons[2]
    assert 'without its key (code)' in reasons[3]


def test_a_forged_composite_key_is_refused(central, private):
    before = central_records(central)
    order = private['order']
    line = {'order_id': order, 'position': 1, 'text': 'taken over'}
    deliver(central,
            # the order part names central's private order
            forged(1, 'keys_line', line, 'facade', 11, refs={'order_id': ['central', order]}),
            # a raw order id, no reference: would be one of central's ids
            forged(2, 'keys_line', line, 'facade', 12),
            forged(3, 'keys_line', {'order_id': order, 'position': 1}, 'facade', 13,
                   refs={'order_id': ['central', order]}, delete=True),
            sender='facade')
    apply(central)
    assert central_records(central) == before
    reasons = refusals(central)
    assert len(reasons) == 3
    assert 'never sent to it' in reasons[0]
    assert 'without saying whom it refers to' in reasons[1]
    assert 'never sent to it' in reasons[2]


# -- randomized convergence ---------------------------------------------------------

CODES = ('AAA', 'BBB', 'CCC', 'DDD')  # few, so that both sides create the same ones
NAMES = ('one', 'two', 'three', None)


class KeyedEditor:
    """Random creates, updates and deletes of UUID notes, coded currencies
    and order lines (a composite key) on either side, each in a
    transaction of its own, as an app publishes them (lines autopublish)."""

    def __init__(self, sides: dict[str, Side], rng: random.Random) -> None:
        self.sides = sides
        self.rng = rng

    def step(self) -> None:
        side = self.sides[self.rng.choice(sorted(self.sides))]
        cls = self.rng.choice((Note, Currency, Line))
        attribute = {Note: 'title', Currency: 'name', Line: 'text'}[cls]
        by_hand = cls is not Line
        with side.session() as session:
            records = session.scalars(select(cls)).all()
            action = self.rng.choice(('create', 'create', 'update', 'update', 'delete'))
            if action == 'create':
                if cls is Note:
                    record = Note(title=self.rng.choice(NAMES))
                elif cls is Line:
                    order = self.rng.choice(session.scalars(select(Order)).all())
                    taken = {r.position for r in records if r.order_id == order.id}
                    free = [p for p in (1, 2, 3) if p not in taken]
                    if not free:
                        return
                    record = Line(order_id=order.id, position=self.rng.choice(free),
                                  text=self.rng.choice(NAMES))
                else:
                    taken = {r.code for r in records}
                    free = [code for code in CODES if code not in taken]
                    if not free:
                        return
                    record = Currency(code=self.rng.choice(free), name=self.rng.choice(NAMES))
                session.add(record)
                session.flush()
                if by_hand:
                    publish(session, record)
            elif records and action == 'update':
                record = self.rng.choice(records)
                setattr(record, attribute, self.rng.choice(NAMES))
                session.flush()
                if by_hand:
                    publish(session, record)
            elif records:
                record = self.rng.choice(records)
                if by_hand:
                    publish_delete(session, record)
                session.delete(record)


def settled(central: Side, facade: Side) -> list[str]:
    """Exchange until nothing is pending; what is still wrong after."""
    for _ in range(4):
        sync(central, facade)
        sync(facade, central)
    problems = [f'{side.name}: {row["last_error"]}' for side in (central, facade)
                for row in side.rows('inbound_messages') if row['processed_at'] is None]
    return problems


@pytest.mark.parametrize('seed', range(3))
def test_random_edits_of_keyed_records_on_both_sides_converge(central, facade, seed):
    rng = random.Random(seed)
    with central.session() as session:  # the orders lines are of, shared
        orders = [Order(name=f'order {i}') for i in range(2)]
        session.add_all(orders)
        session.flush()
        for order in orders:
            publish(session, order)
    sync(central, facade)
    editor = KeyedEditor({'central': central, 'facade': facade}, rng)
    for _ in range(50):
        if rng.random() < 0.2:
            source, target = rng.choice(((central, facade), (facade, central)))
            sync(source, target)
        else:
            editor.step()
    assert settled(central, facade) == []
    for cls in (Note, Currency):
        assert rows(central, cls) == rows(facade, cls)
    copies = {r['id']: r['name'] for r in rows(central, Order)}, {
        r['id']: r['name'] for r in rows(facade, Order)}
    assert [{**r, 'order_id': copies[0][r['order_id']]} for r in rows(central, Line)] == \
        [{**r, 'order_id': copies[1][r['order_id']]} for r in rows(facade, Line)]
    report = Verifier(central.engine, 'central', InProcess(facade)).run(
        ['keys_currency', 'keys_line', 'keys_note'])
    assert report.differences == []
