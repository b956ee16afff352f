"""Foreign keys *to* keyed models (docs/security.rst, docs/models.rst
Primary keys): an order pointing at a currency by its code, or at a note
by its UUID, applies on both sides when the target was shared, waits for
a target that has not arrived yet, and is refused when it names a record
of the receiver that was never shared with the sender.

Messages travel as the wire carries them (``forward``) and are applied
as the server and ``pcommunicate`` apply them (``apply``).
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import (
    ForeignKey,
    ForeignKeyConstraint,
    Integer,
    MetaData,
    String,
    Uuid,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from test_records import apply, deliver, sync, with_tables

from pyramid_communicator import publish, receives_from
from pyramid_communicator.models import NAMING_CONVENTION
from pyramid_communicator.versions import now_hlc
from pyramid_communicator.wire import WireMessage

if TYPE_CHECKING:
    from conftest import Side


class RefsBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


@receives_from('keyrefs_currency')
class Currency(RefsBase):
    __tablename__ = 'keyrefs_currencies'
    code: Mapped[str] = mapped_column(String(3), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(50))


@receives_from('keyrefs_note')
class Note(RefsBase):
    __tablename__ = 'keyrefs_notes'
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    title: Mapped[str | None] = mapped_column(String(50))


@receives_from('keyrefs_rate')
class Rate(RefsBase):
    """A composite key: a currency and a day."""
    __tablename__ = 'keyrefs_rates'
    currency_code: Mapped[str] = mapped_column(ForeignKey('keyrefs_currencies.code'),
                                               primary_key=True)
    day: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    value: Mapped[str | None] = mapped_column(String(20))


@receives_from('keyrefs_order')
class Order(RefsBase):
    """A surrogate key, pointing at keyed records by their keys."""
    __tablename__ = 'keyrefs_orders'
    __table_args__ = (ForeignKeyConstraint(['rate_currency', 'rate_day'],
                                           ['keyrefs_rates.currency_code',
                                            'keyrefs_rates.day']),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str | None] = mapped_column(String(50))
    currency_code: Mapped[str | None] = mapped_column(ForeignKey('keyrefs_currencies.code'))
    note_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey('keyrefs_notes.id'))
    rate_currency: Mapped[str | None] = mapped_column(String(3))
    rate_day: Mapped[int | None] = mapped_column(Integer)


@receives_from('keyrefs_line')
class Line(RefsBase):
    """A composite key with a part mapped through ``refs`` (the order)."""
    __tablename__ = 'keyrefs_lines'
    order_id: Mapped[int] = mapped_column(ForeignKey('keyrefs_orders.id'), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)


@receives_from('keyrefs_remark')
class Remark(RefsBase):
    """Points at a line by its key, whose order part is an id of the
    sender's: such a reference cannot be synced."""
    __tablename__ = 'keyrefs_remarks'
    __table_args__ = (ForeignKeyConstraint(['line_order', 'line_position'],
                                           ['keyrefs_lines.order_id',
                                            'keyrefs_lines.position']),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    line_order: Mapped[int | None] = mapped_column(Integer)
    line_position: Mapped[int | None] = mapped_column(Integer)


@pytest.fixture
def central(make_side) -> Iterator[Side]:
    yield from with_tables(make_side('central'), RefsBase)


@pytest.fixture
def facade(make_side) -> Iterator[Side]:
    yield from with_tables(make_side('facade'), RefsBase)



def orders(side: Side) -> list[dict[str, Any]]:
    """The orders as a user of the side sees them (ids aside)."""
    with side.session() as session:
        return sorted(({'name': o.name, 'currency': o.currency_code, 'note': o.note_id,
                        'rate': (o.rate_currency, o.rate_day)}
                       for o in session.scalars(select(Order))), key=lambda o: o['name'])


def everything(side: Side) -> list:
    with side.session() as session:
        return [sorted(repr(sorted(vars(r).items(), key=str)).replace(
            repr(r._sa_instance_state), '') for r in session.scalars(select(cls)))
            for cls in (Currency, Note, Rate, Order)]


def add(side: Side, *records: object, shared: bool = True) -> None:
    with side.session() as session:
        session.add_all(records)
        session.flush()
        if shared:
            for record in records:
                publish(session, record)


def problems(side: Side) -> list[str]:
    return [row['last_error'] for row in side.rows('inbound_messages')
            if row['last_error'] or row['refused_at']]


def refusals(side: Side) -> list[str]:
    return [row['last_error'] for row in side.rows('inbound_messages') if row['refused_at']]


NOTE = uuid.UUID('0b5e6a4e-8f9c-4bd5-9d43-6a2c33b1e001')


def test_an_order_pointing_at_shared_keyed_records_applies_both_ways(central, facade):
    add(central, Currency(code='EUR', name='euro'), Note(id=NOTE, title='shared'))
    add(central, Rate(currency_code='EUR', day=1, value='1.0'))
    add(central, Order(name='from central', currency_code='EUR', note_id=NOTE,
                       rate_currency='EUR', rate_day=1))
    sync(central, facade)
    expected = {'name': 'from central', 'currency': 'EUR', 'note': NOTE, 'rate': ('EUR', 1)}
    assert orders(facade) == [expected]

    add(facade, Currency(code='JPY', name='yen'))
    add(facade, Order(name='from the facade', currency_code='JPY', note_id=NOTE,
                      rate_currency='EUR', rate_day=1))
    sync(facade, central)
    assert orders(central) == orders(facade) == [
        {'name': 'from central', 'currency': 'EUR', 'note': NOTE, 'rate': ('EUR', 1)},
        {'name': 'from the facade', 'currency': 'JPY', 'note': NOTE, 'rate': ('EUR', 1)}]
    assert problems(central) == problems(facade) == []


def test_a_target_arriving_in_the_same_batch_or_later_applies(central, facade):
    # One transaction, targets published first (as autopublish's flush
    # order has them): one batch applies them all.
    with central.session() as session:
        session.add_all([Currency(code='GBP', name='pound'), Note(id=NOTE, title='n')])
        session.flush()
        order = Order(name='a', currency_code='GBP', note_id=NOTE)
        session.add(order)
        session.flush()
        publish(session, session.get(Currency, 'GBP'))
        publish(session, session.get(Note, NOTE))
        publish(session, order)
    sync(central, facade)
    assert orders(facade) == [{'name': 'a', 'currency': 'GBP', 'note': NOTE,
                               'rate': (None, None)}]
    assert problems(facade) == []

    # The order ahead of its currency in the batch: the batch applies the
    # currency first (dependency order), both in the same run.
    with central.session() as session:
        session.add(Currency(code='DKK', name='krone'))
        session.flush()
        order = Order(name='b', currency_code='DKK')
        session.add(order)
        session.flush()
        publish(session, order)
        publish(session, session.get(Currency, 'DKK'))
    sync(central, facade)
    assert [o['name'] for o in orders(facade)] == ['a', 'b']
    assert problems(facade) == []

    # The currency in a later run: the order waits for it.
    with central.session() as session:
        session.add(Currency(code='SEK', name='krona'))
        session.flush()
        order = Order(name='c', currency_code='SEK')
        session.add(order)
        session.flush()
        publish(session, order)
    sync(central, facade)
    assert [o['name'] for o in orders(facade)] == ['a', 'b']
    with central.session() as session:
        publish(session, session.get(Currency, 'SEK'))
    sync(central, facade)
    apply(facade)
    assert [o['currency'] for o in orders(facade)] == ['GBP', 'DKK', 'SEK']
    assert refusals(facade) == []


# -- a hostile facade ----------------------------------------------------------------

def forged(remote_id: int, name: str, attributes: dict[str, Any], origin: str,
           original_id: int, clock: dict[str, int] | None = None) -> WireMessage:
    """A message as a compromised facade would write it."""
    hlc = now_hlc()
    version = {'clock': {'facade': hlc, **(clock or {})},
               'stamps': {key: [hlc, 'facade'] for key in attributes}}
    return WireMessage(remote_id, json.dumps({name: attributes}), origin, original_id,
                       None, version)


@pytest.fixture
def world(central, facade) -> dict[str, Any]:
    """An order and a currency shared with the facade; a currency, a note
    and a rate central never shared."""
    add(central, Currency(code='EUR', name='euro'))
    add(central, Order(name='shared order', currency_code='EUR'))
    sync(central, facade)
    add(central, Currency(code='CHF', name='private franc'), Note(id=NOTE, title='private'),
        shared=False)
    add(central, Rate(currency_code='CHF', day=1, value='private'), shared=False)
    with central.session() as session:
        order_id = session.scalars(select(Order.id)).one()
    mapping = [row for row in central.rows('communicator_mappings')
               if row['name'] == 'keyrefs_order']
    return {'order': order_id, 'clock': json.loads(mapping[0]['version'])['clock']['']}


ATTACKS = {
    'create an order pointing at a private currency':
        lambda w: forged(1, 'keyrefs_order', {'name': 'x', 'currency_code': 'CHF'},
                         'facade', 7),
    'create an order pointing at a private note':
        lambda w: forged(1, 'keyrefs_order', {'name': 'x', 'note_id': str(NOTE)},
                         'facade', 7),
    'create an order pointing at a private composite key':
        lambda w: forged(1, 'keyrefs_order', {'name': 'x', 'rate_currency': 'CHF',
                                              'rate_day': 1}, 'facade', 7),
    'create a rate (a keyed record) of a private currency':
        lambda w: forged(1, 'keyrefs_rate', {'currency_code': 'CHF', 'day': 2, 'value': 'x'},
                         'facade', 7),
    'point the shared order at a private currency':
        lambda w: forged(1, 'keyrefs_order', {'name': 'shared order', 'currency_code': 'CHF'},
                         'central', w['order'], clock={'central': w['clock']}),
    'point the shared order at a private note':
        lambda w: forged(1, 'keyrefs_order', {'note_id': str(NOTE)}, 'central', w['order'],
                         clock={'central': w['clock']}),
}


@pytest.mark.parametrize('attack', ATTACKS)
def test_a_reference_to_a_private_keyed_record_is_refused(central, world, attack):
    before = everything(central)
    deliver(central, ATTACKS[attack](world), sender='facade')
    apply(central)
    assert everything(central) == before
    [reason] = refusals(central)
    assert 'which was never sent to it' in reason
    assert 'referring to keyrefs_' in reason


def test_a_malformed_key_reference_is_refused(central, world):
    before = everything(central)
    deliver(central,
            forged(1, 'keyrefs_order', {'name': 'x', 'note_id': 'not a uuid'}, 'facade', 7),
            forged(2, 'keyrefs_order', {'name': 'y', 'currency_code': 'X' * 300},
                   'facade', 8),
            sender='facade')
    apply(central)
    assert everything(central) == before
    reasons = refusals(central)
    assert len(reasons) == 2
    assert all('that is no key of' in reason for reason in reasons)


def test_a_published_target_not_delivered_yet_waits_for_its_delivery(central, facade, world):
    add(central, Currency(code='NOK', name='krone'))  # published, still in the queue
    deliver(central, forged(1, 'keyrefs_order', {'name': 'early', 'currency_code': 'NOK'},
                            'facade', 7), sender='facade')
    apply(central)
    assert [o['name'] for o in orders(central)] == ['shared order']
    assert any('not delivered yet' in error for error in problems(central))
    assert refusals(central) == []
    sync(central, facade)  # the currency goes out
    apply(central)
    assert [o['name'] for o in orders(central)] == ['early', 'shared order']


def test_a_composite_reference_to_a_key_with_a_mapped_part_is_refused(central, facade):
    with facade.session() as session:
        order = Order(name='with a line')
        session.add(order)
        session.flush()
        session.add(Line(order_id=order.id, position=1))
        session.flush()
        session.add(Remark(line_order=order.id, line_position=1))
        session.flush()
        for record in (order, *session.scalars(select(Line)), *session.scalars(select(Remark))):
            publish(session, record)
    sync(facade, central)
    assert len(orders(central)) == 1
    with central.session() as session:
        assert session.scalars(select(Line)).all() != []
        assert session.scalars(select(Remark)).all() == []
    [reason] = refusals(central)
    assert 'keyrefs_remark.(line_order, line_position), which refers to keyrefs_line, ' \
        'whose key part order_id is a foreign key mapped through refs' in reason
