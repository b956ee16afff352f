"""Every common column type round-trips exactly: published by one side,
applied by the other, published back and applied again, on one backend
and between two (``make_side(..., backend=)``), and a record received and
published again is no new edit (its fingerprints are the ones its
values have once read back, on any backend).
"""
from __future__ import annotations

import contextlib
import datetime
import decimal
import enum
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Double,
    Enum,
    Integer,
    Interval,
    LargeBinary,
    MetaData,
    Numeric,
    Text,
    Time,
    TypeDecorator,
    Uuid,
    select,
)
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from test_records import apply, forward, with_tables

from pyramid_communicator import publish, receives_from
from pyramid_communicator.models import NAMING_CONVENTION
from pyramid_communicator.records import (
    decode_body,
    duration,
    from_wire,
    parse_duration,
    receiver_of,
)
from pyramid_communicator.versions import Version

# MySQL's DATETIME and TIME keep no fraction of a second unless told
# (fsp), its TEXT and BLOB hold 64 KiB, its FLOAT is single precision:
# the declarations a model needs to keep what the other backends keep.
Micro = DateTime().with_variant(mysql.DATETIME(fsp=6), 'mysql')
MicroAware = DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), 'mysql')
MicroTime = Time().with_variant(mysql.TIME(fsp=6), 'mysql')
LongText = Text().with_variant(mysql.LONGTEXT(), 'mysql')


class Color(enum.Enum):
    RED = 'r'
    GREEN = 'g'


class TZDateTime(TypeDecorator):
    """SQLAlchemy's recipe: aware datetimes in, naive UTC stored, aware
    UTC out.  Its process_bind_param refuses a naive value."""
    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Any) -> Any:
        if dialect.name == 'mysql':
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime())

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if value is not None:
            if value.tzinfo is None:
                raise TypeError('tzinfo is required')
            value = value.astimezone(datetime.UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return value.replace(tzinfo=datetime.UTC) if value is not None else None


class TypesBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


@receives_from('types_sample')
class TypesSample(TypesBase):
    __tablename__ = 'types_samples'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    day: Mapped[datetime.date | None] = mapped_column(Date)
    at: Mapped[datetime.datetime | None] = mapped_column(Micro)
    at_whole: Mapped[datetime.datetime | None] = mapped_column(Micro)
    aware: Mapped[datetime.datetime | None] = mapped_column(MicroAware)
    clock: Mapped[datetime.time | None] = mapped_column(MicroTime)
    span: Mapped[datetime.timedelta | None] = mapped_column(Interval)
    amount: Mapped[decimal.Decimal | None] = mapped_column(Numeric(20, 4))
    price: Mapped[decimal.Decimal | None] = mapped_column(Numeric(10, 2))
    ratio: Mapped[float | None] = mapped_column(Double)
    flag: Mapped[bool | None] = mapped_column(Boolean)
    color: Mapped[Color | None] = mapped_column(Enum(Color, name='types_color'))
    doc: Mapped[Any] = mapped_column(JSON, nullable=True)
    blob: Mapped[bytes | None] = mapped_column(LargeBinary)
    token: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    big: Mapped[int | None] = mapped_column(BigInteger)
    text: Mapped[str | None] = mapped_column(LongText)
    stamp: Mapped[datetime.datetime | None] = mapped_column(TZDateTime)


class TypesPgBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


@receives_from('types_pg')
class TypesPg(TypesPgBase):
    """PostgreSQL's own types; on the other backends ``tags`` and ``doc``
    are JSON (which holds them) and ``days`` is Text (which cannot)."""
    __tablename__ = 'types_pg'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tags: Mapped[list | None] = mapped_column(
        postgresql.ARRAY(Text).with_variant(JSON, 'sqlite', 'mysql'))
    grid: Mapped[list | None] = mapped_column(
        postgresql.ARRAY(Integer, dimensions=2).with_variant(JSON, 'sqlite', 'mysql'))
    days: Mapped[list | None] = mapped_column(
        postgresql.ARRAY(Date).with_variant(Text, 'sqlite', 'mysql'))
    doc: Mapped[Any] = mapped_column(
        postgresql.JSONB().with_variant(JSON, 'sqlite', 'mysql'), nullable=True)


AWARE = datetime.datetime(2024, 2, 29, 23, 59, 58, 123456,
                          tzinfo=datetime.timezone(datetime.timedelta(hours=5, minutes=30)))


def sample(interval_micro: bool = True, zones: bool = True) -> dict[str, Any]:
    """Values that trip a careless wire format; ``interval_micro`` False
    where MySQL keeps an Interval (an epoch DATETIME without fsp);
    ``zones`` False where the backend that first stores ``aware`` keeps no
    zone (SQLite, MySQL: a ``DateTime(timezone=True)`` there stores the
    wall time as given, so a host stores UTC, or uses a decorator such as
    ``TZDateTime``, whose value keeps its +05:30 everywhere)."""
    return dict(
        day=datetime.date(2024, 2, 29),
        at=datetime.datetime(2024, 2, 29, 23, 59, 58, 123456),
        at_whole=datetime.datetime(1999, 12, 31, 23, 59, 59),
        aware=AWARE if zones else AWARE.astimezone(datetime.UTC),
        clock=datetime.time(23, 59, 58, 654321),
        span=datetime.timedelta(days=-3, seconds=7, microseconds=5 if interval_micro else 0),
        amount=decimal.Decimal('1234567890.1250'),
        price=decimal.Decimal('1.50'),
        ratio=0.1 + 0.2,
        flag=False,
        color=Color.GREEN,
        doc={'ünï': ['ß', {'n': 1.5, 'big': 2 ** 60 + 3, 'none': None}], 'emoji': '🙂',
             'deep': [[[{'a': [True, False]}]]]},
        blob=bytes(range(256)) * 100,
        token=uuid.UUID('12345678-9abc-4def-8123-456789abcdef'),
        big=2 ** 62 + 1,
        text='ünïcødé 🙂 中文 \t\n"\\' * 60_000,  # about 1 MB of UTF-8
        stamp=AWARE,
    )


def expected(values: dict[str, Any]) -> dict[str, Any]:
    """What reads back: aware instants in UTC (the same instant)."""
    return {**values, 'aware': values['aware'].astimezone(datetime.UTC),
            'stamp': values['stamp'].astimezone(datetime.UTC)}


def create(side: Any, cls: type, values: dict[str, Any]) -> int:
    with side.session() as session:
        record = cls(**values)
        session.add(record)
        session.flush()
        publish(session, record)
        return record.id


def read(side: Any, cls: type) -> dict[str, Any]:
    """The one record's values as the backend hands them back, typed, as
    versions see them: an aware datetime in UTC (PostgreSQL reads it in
    the session's zone, SQLite and MySQL naive: UTC as written)."""
    with side.session() as session:
        [record] = session.scalars(select(cls)).all()
        receiver = receiver_of(record)
        return {key: receiver.canonical(key, getattr(record, key))
                for key in cls.__mapper__.columns.keys() if key != 'id'}


def republish(side: Any, cls: type) -> dict[str, Any]:
    """Publish the one record again, unchanged, as read back; its version."""
    with side.session() as session:
        [record] = session.scalars(select(cls)).all()
        message = publish(session, record)
        return json.loads(message.version)


def assert_same(found: dict[str, Any], wanted: dict[str, Any]) -> None:
    for key, value in wanted.items():
        assert found[key] == value, key
        assert type(found[key]) is type(value), key
    assert found['ratio'].hex() == wanted['ratio'].hex()  # bit for bit
    assert str(found['price']) == '1.50'  # the scale kept


def round_trip(central: Any, facade: Any, values: dict[str, Any]) -> None:
    create(central, TypesSample, values)
    sent = republish(central, TypesSample)
    forward(central, facade)
    assert apply(facade).failed == 0
    assert_same(read(facade, TypesSample), expected(values))

    # Received and published again: no edit of the facade's anywhere.
    version = republish(facade, TypesSample)
    assert {stamp[1] for stamp in version['stamps'].values()} == {'central'}, version
    assert {key: stamp[0] for key, stamp in version['stamps'].items()} == \
        {key: stamp[0] for key, stamp in sent['stamps'].items()}

    # And back: the facade's copy edits one attribute, the rest crosses again.
    with facade.session() as session:
        [record] = session.scalars(select(TypesSample)).all()
        record.flag = True
        publish(session, record)
    forward(facade, central)
    assert apply(central).failed == 0
    assert_same(read(central, TypesSample), expected({**values, 'flag': True}))
    version = republish(central, TypesSample)
    # central's own edits are named '' (this app) in its outbound versions
    edited = {key: stamp[1] for key, stamp in version['stamps'].items() if stamp[1] != ''}
    assert edited == {'flag': 'facade'}, version


@pytest.fixture
def central(make_side) -> Iterator[Any]:
    yield from with_tables(make_side('central'), TypesBase)


@pytest.fixture
def facade(make_side) -> Iterator[Any]:
    yield from with_tables(make_side('facade'), TypesBase)


def test_every_type_round_trips_both_ways(central, facade, backend):
    round_trip(central, facade, sample(interval_micro=backend != 'mysql',
                                       zones=backend == 'postgresql'))


def test_null_round_trips_everywhere(central, facade):
    nulls = dict.fromkeys(sample(), None)
    create(central, TypesSample, nulls)
    forward(central, facade)
    assert apply(facade).failed == 0
    assert read(facade, TypesSample) == nulls
    assert {stamp[1] for stamp in republish(facade, TypesSample)['stamps'].values()} == \
        {'central'}


@pytest.mark.slow
@pytest.mark.backends('sqlite')  # the pairs pick their own backends: once per run
@pytest.mark.parametrize('central_db, facade_db', [
    ('sqlite', 'postgresql'), ('postgresql', 'sqlite'), ('mysql', 'postgresql'),
    ('sqlite', 'mysql'),
])
def test_every_type_round_trips_between_backends(central_db, facade_db, make_side):
    central = make_side('central', backend=central_db)
    facade = make_side('facade', backend=facade_db)
    tables = [with_tables(central, TypesBase), with_tables(facade, TypesBase)]
    for tables_of in tables:
        next(tables_of)
    try:
        round_trip(central, facade, sample(interval_micro='mysql' not in (central_db, facade_db),
                                           zones=central_db == 'postgresql'))
    finally:
        for tables_of in tables:
            next(tables_of, None)


# -- PostgreSQL's own types -------------------------------------------------------------

PG_VALUES = dict(tags=['ünï', 'two words', '', '🙂'], grid=[[1, 2], [3, 2 ** 31 - 1]],
                 days=[datetime.date(2024, 2, 29), datetime.date(1970, 1, 1)],
                 doc={'k': [1, 2.5, 'ß', None, {'nested': True}]})


@contextlib.contextmanager
def pg_tables(*sides: Any) -> Iterator[None]:
    """The PostgreSQL-typed test tables on each side, dropped afterwards."""
    tables = [with_tables(side, TypesPgBase) for side in sides]
    for tables_of in tables:
        next(tables_of)
    try:
        yield
    finally:
        for tables_of in tables:
            next(tables_of, None)


@pytest.mark.backends('postgresql')
def test_array_and_jsonb_round_trip_between_postgresql_apps(make_side):
    central, facade = make_side('central'), make_side('facade')
    with pg_tables(central, facade):
        create(central, TypesPg, PG_VALUES)
        forward(central, facade)
        assert apply(facade).failed == 0
        assert read(facade, TypesPg) == PG_VALUES
        version = republish(facade, TypesPg)
        assert {stamp[1] for stamp in version['stamps'].values()} == {'central'}


@pytest.mark.slow
@pytest.mark.backends('sqlite')
@pytest.mark.parametrize('other', ['sqlite', 'mysql'])
def test_a_side_that_cannot_hold_an_array_says_which_column(make_side, other):
    central = make_side('central', backend='postgresql')
    facade = make_side('facade', backend=other)
    with pg_tables(central, facade):
        create(central, TypesPg, PG_VALUES)
        forward(central, facade)
        assert apply(facade).failed == 1
        [row] = [row for row in facade.rows('inbound_messages') if row['last_error']]
        assert 'types_pg.days' in row['last_error'] and 'Text()' in row['last_error'], row
        assert 'cannot hold the JSON array' in row['last_error']



# -- the wire forms -----------------------------------------------------------------------

def test_big_integers_cross_as_exact_json_integers(central):
    create(central, TypesSample, {'big': 2 ** 63 - 1, 'doc': {'n': -(2 ** 63)}})
    [row] = central.rows('outbound_messages')
    assert '"big":9223372036854775807' in row['body']
    assert '"n":-9223372036854775808' in row['body']
    name, attributes = decode_body(row['body'])
    assert attributes['big'] == 2 ** 63 - 1 and type(attributes['big']) is int


def test_a_numeric_sent_as_a_json_number_takes_its_digits_not_a_double(central):
    column = TypesSample.__table__.c.amount
    _, attributes = decode_body('{"types_sample":{"amount":0.1000,"ratio":0.1}}')
    assert from_wire(column, attributes['amount']) == decimal.Decimal('0.1000')
    assert str(from_wire(column, attributes['amount'])) == '0.1000'
    assert type(from_wire(TypesSample.__table__.c.ratio, attributes['ratio'])) is float


@pytest.mark.parametrize('value', [
    datetime.timedelta(0), datetime.timedelta(microseconds=-1),
    datetime.timedelta(days=-3, seconds=7, microseconds=5),
    datetime.timedelta(days=999_999, seconds=86_399, microseconds=999_999),
    datetime.timedelta(hours=1, microseconds=500_000),
])
def test_intervals_have_an_exact_wire_form(value):
    assert parse_duration(duration(value)) == value


def test_values_set_in_another_python_type_are_no_phantom_edits(central):
    """A Numeric set from an int, a Float from an int, an aware datetime:
    once read back they are Decimal, float, UTC; the fingerprints agree."""
    with central.session() as session:
        record = TypesSample(price=2, ratio=1, aware=AWARE.astimezone(datetime.UTC), flag=1)
        session.add(record)
        session.flush()
        first = json.loads(publish(session, record).version)
    assert republish(central, TypesSample)['stamps'] == first['stamps']


def test_fingerprints_do_not_depend_on_how_a_backend_reads_a_value():
    sent = Version()
    sent.edit({'price': _fp(decimal.Decimal('1.50')), 'at': _fp(AWARE),
               'whole': _fp(datetime.datetime(2024, 1, 1))})
    assert not sent.edit({'price': _fp(decimal.Decimal('1.5')),  # SQLite, scale 1
                          'at': _fp(AWARE.astimezone(datetime.timezone(
                              datetime.timedelta(hours=-8)))),  # another session zone
                          'whole': _fp(datetime.datetime(2024, 1, 1, 0, 0, 0, 0))})


def _fp(value: Any) -> str:
    from pyramid_communicator.records import fingerprint
    return fingerprint(value)


def test_the_decorator_gets_an_aware_value():
    """``TZDateTime`` refuses naive values: what it gets from the wire
    keeps its zone (its impl's python type, datetime, parses it)."""
    column = TypesSample.__table__.c.stamp
    value = from_wire(column, '2024-02-29T18:29:58.123456+00:00', 'sqlite')
    assert value == AWARE and value.tzinfo is not None
