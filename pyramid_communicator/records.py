"""Which models take part in sync, and how a record becomes a message body
and a message body becomes attribute values again.

``receives_from`` (in :mod:`.publishing`, which also wires autopublish)
registers a mapped class here under its wire name.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
import enum
import functools
import json
import re
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.orm.exc import UnmappedColumnError
from sqlalchemy.types import TypeDecorator, TypeEngine

from .conflicts import Policy
from .versions import digest

#: ``session.info`` key set while inbound messages are applied, so that
#: autopublish never echoes a received change back to its sender.
APPLYING = 'pyramid_communicator.applying'

#: What a peer may do to a model's records (``receives_from(accept=...)``).
OPERATIONS = frozenset({'create', 'update', 'delete'})


class UnknownRecord(LookupError):
    """A message names a record no model ``receives_from``."""


class WireTypeError(ValueError):
    """A wire value the column cannot hold (a JSON array for a column
    that is no ARRAY or JSON, say): the message fails, naming both."""


@dataclasses.dataclass(frozen=True)
class Receiver:
    name: str
    cls: type
    exclude: frozenset[str]
    only: frozenset[str] | None
    autopublish: bool
    policy: Policy
    match_on: tuple[str, ...] = ()
    deletes: bool = False
    accept: frozenset[str] = frozenset({'create', 'update'})
    #: The primary key is the identity (:mod:`.keys`): it crosses the wire
    #: and is the model's ``match_on``.
    keyed: bool = False

    def crosses(self, attribute: str) -> bool:
        """May this attribute travel on the wire, in either direction?  The
        discriminator of a polymorphic hierarchy always does: it is what
        makes the receiver create the right subclass."""
        if attribute == self.polymorphic_key:
            return True
        if attribute in self.exclude:
            return False
        return self.only is None or attribute in self.only

    @property
    def primary_key(self) -> list[str]:
        mapper = inspect(self.cls)
        return [mapper.get_property_by_column(c).key for c in mapper.primary_key]

    @functools.cached_property
    def polymorphic_key(self) -> str | None:
        """The attribute holding the polymorphic identity of the registered
        class's hierarchy (None: no hierarchy, or one told apart by an
        expression, which cannot cross)."""
        mapper = inspect(self.cls)
        column = mapper.polymorphic_on
        if column is None:
            return None
        try:
            return mapper.get_property_by_column(column).key
        except UnmappedColumnError:  # an SQL expression
            return None

    def subclass(self, identity: Any) -> type | None:
        """The class a record of this polymorphic identity is, if it is the
        registered class or one of its subclasses (None otherwise: an
        unknown identity, or one of a class outside the registered one)."""
        mapper = inspect(self.cls).polymorphic_map.get(identity)
        if mapper is None or not mapper.isa(inspect(self.cls)):
            return None
        return mapper.class_

    def references(self, cls: type | None = None) -> dict[str, Receiver]:
        """Attribute key -> receiver of the record a foreign key points at,
        for crossing columns whose foreign key targets a synced model; of
        ``cls`` (a subclass of the registered class), by default of the
        registered class."""
        cls = self.cls if cls is None else cls
        found = self._references.get(cls)
        if found is None:
            # On first use, once every model is registered and mapped.
            found = self._references[cls] = {}
            for key, column in self.columns(cls).items():
                for fk in column.foreign_keys:
                    target = _receiver_of_table(fk.column.table)
                    # A foreign key to a keyed model holds its key, which is
                    # the same on every side: sent as it is, checked on
                    # arrival (:mod:`.keyrefs`).
                    if target is not None and fk.column.primary_key and not target.keyed:
                        found[key] = target
        return found

    def columns(self, cls: type | None = None) -> dict[str, Any]:
        """Attribute key -> Column, for the attributes of ``cls`` (the
        registered class by default, or a subclass of it) that may cross."""
        cls = self.cls if cls is None else cls
        found = self._columns.get(cls)
        if found is None:
            mapper = inspect(cls)
            pk = set(self.primary_key)
            found = self._columns[cls] = {
                prop.key: prop.columns[0] for prop in mapper.column_attrs
                if (prop.key in pk and self.keyed)
                or (prop.key not in pk and self.crosses(prop.key))}
        return found

    def all_columns(self) -> dict[str, Any]:
        """The crossing attributes of the registered class and all its
        subclasses: what a message for this record name may hold."""
        found: dict[str, Any] = {}
        for mapper in inspect(self.cls).self_and_descendants:
            for key, column in self.columns(mapper.class_).items():
                found.setdefault(key, column)
        return found

    def all_references(self) -> dict[str, Receiver]:
        """:meth:`references` of the registered class and its subclasses."""
        found: dict[str, Receiver] = {}
        for mapper in inspect(self.cls).self_and_descendants:
            for key, target in self.references(mapper.class_).items():
                found.setdefault(key, target)
        return found

    def canonical(self, key: str, value: Any) -> Any:
        """An attribute's value as every backend reads it back (see
        :func:`canonicalizer`): what versions fingerprint, so that a value
        read from the database does not look like an edit of the value
        that was set or received."""
        convert = self._canonicalizers.get(key)
        if convert is None and key not in self._canonicalizers_known:
            convert = self._canonicalizer_of(key)
        return value if convert is None or value is None else convert(value)

    def _canonicalizer_of(self, key: str) -> Callable[[Any], Any] | None:
        column = self.columns().get(key)
        if column is None:
            column = self.all_columns().get(key)
        convert = None if column is None else canonicalizer(column.type)
        self._canonicalizers[key] = convert
        self._canonicalizers_known.add(key)
        return convert

    @functools.cached_property
    def _canonicalizers(self) -> dict[str, Callable[[Any], Any] | None]:
        return {}

    @functools.cached_property
    def _canonicalizers_known(self) -> set[str]:
        return set()

    @functools.cached_property
    def _columns(self) -> dict[type, dict[str, Any]]:
        return {}

    @functools.cached_property
    def _references(self) -> dict[type, dict[str, Receiver]]:
        return {}


_by_name: dict[str, Receiver] = {}
_by_class: dict[type, Receiver] = {}


def register(receiver: Receiver) -> None:
    previous = _by_name.get(receiver.name)
    if previous is not None and previous.cls.__qualname__ != receiver.cls.__qualname__:
        raise ValueError(f'{receiver.name!r} is already received by {previous.cls!r}')
    _by_name[receiver.name] = receiver
    _by_class[receiver.cls] = receiver


def receiver_of_table(table: Any) -> Receiver | None:
    """The receiver of the model mapped to ``table``, None if it does not sync."""
    return _receiver_of_table(table)


def _receiver_of_table(table: Any) -> Receiver | None:
    """The receiver whose class, or a subclass of it (joined-table
    inheritance), is mapped to ``table``."""
    for receiver in _by_class.values():
        for mapper in inspect(receiver.cls).self_and_descendants:
            if mapper.local_table is table:
                return receiver
    return None


def receiver_of_class(cls: type) -> Receiver | None:
    """The receiver of a mapped class (or of a base it inherits), if any."""
    for base in cls.__mro__:
        if base in _by_class:
            return _by_class[base]
    return None


def receivers() -> list[Receiver]:
    """Every registered receiver, in registration order."""
    return list(_by_name.values())


def receiver_for(name: str) -> Receiver:
    try:
        return _by_name[name]
    except KeyError:
        raise UnknownRecord(f'no model receives_from {name!r}') from None


def receiver_of(obj: object) -> Receiver:
    for cls in type(obj).__mro__:
        if cls in _by_class:
            return _by_class[cls]
    raise UnknownRecord(f'{type(obj).__name__} is not registered with receives_from')


# -- record -> message ------------------------------------------------------

def to_wire(value: Any) -> Any:
    """A Python value as JSON holds it.  Aware datetimes go as UTC (one
    instant, one string, whatever zone the backend read it in); enums by
    name, as SQLAlchemy's ``Enum`` stores them; intervals as an ISO 8601
    duration of days and seconds (see :func:`duration`)."""
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(datetime.UTC)
        return value.isoformat()
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode('ascii')
    if isinstance(value, datetime.timedelta):
        return duration(value)
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (list, tuple)):  # an ARRAY (of dates, say), a JSON list
        return [item if type(item) in _PLAIN else to_wire(item) for item in value]
    return value


_MICROSECONDS_A_DAY = 86_400_000_000
_DURATION = re.compile(r'(-?)P(\d+)DT(\d+)(?:\.(\d{1,6}))?S')


def duration(value: datetime.timedelta) -> str:
    """An interval exactly, as ISO 8601 days and seconds with microseconds
    (``P1DT3600.5S``, ``-P0DT0.000001S``): no months or years, whose
    length depends on the date, so it means one timedelta everywhere."""
    micro = (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds
    sign = '-' if micro < 0 else ''
    days, rest = divmod(abs(micro), _MICROSECONDS_A_DAY)
    seconds, micro = divmod(rest, 1_000_000)
    fraction = f'.{micro:06d}' if micro else ''
    return f'{sign}P{days}DT{seconds}{fraction}S'


def parse_duration(text: str) -> datetime.timedelta:
    found = _DURATION.fullmatch(text)
    if found is None:
        raise ValueError(f'not an interval as the wire writes one (P<days>DT<seconds>S): '
                         f'{text[:40]!r}')
    sign, days, seconds, fraction = found.groups()
    value = datetime.timedelta(days=int(days), seconds=int(seconds),
                               microseconds=int((fraction or '0').ljust(6, '0')))
    return -value if sign else value


_PLAIN = frozenset({str, int, float, bool, type(None)})
_compact = json.JSONEncoder(separators=(',', ':'), ensure_ascii=False).encode


def fingerprint(value: Any) -> str:
    """The digest a version keeps of an attribute's Python value; equal
    numbers compare equal whatever their scale (``1.5`` and ``1.50``)."""
    if type(value) in _PLAIN:
        return digest(value)  # its own wire value
    if isinstance(value, decimal.Decimal) and value.is_finite():
        value = value.normalize()
    return digest(to_wire(value))


def natural_key(receiver: Receiver, values: dict[str, Any]) -> str | None:
    """A digest of a record's ``match_on`` values (Python values), or None
    if the model has no natural key or a value is missing."""
    if not receiver.match_on:
        return None
    parts = [values.get(key) for key in receiver.match_on]
    if any(part is None for part in parts):
        return None
    return digest([fingerprint(part) for part in parts])


def record_values(obj: object) -> dict[str, Any]:
    """The record's crossing attributes as wire values."""
    receiver = receiver_of(obj)
    state = inspect(obj)
    values = {}
    for key in receiver.columns(type(obj)):
        # Read through the state, never the attribute: no lazy loads, no
        # autoflush in the middle of a flush.
        if key in state.dict:
            value = state.dict[key]
        else:
            value = getattr(obj, key) if state.has_identity else None
        values[key] = receiver.canonical(key, value)
    return values


def encode_body(name: str, values: dict[str, Any]) -> str:
    """The JSON string the wire's ``body`` holds: ``{name: {attr: value}}``."""
    return _compact({name: {key: value if type(value) in _PLAIN else to_wire(value)
                            for key, value in values.items()}})


def local_id(obj: object) -> int | None:
    identity = inspect(obj).identity
    if identity is None or len(identity) != 1:
        return None
    return identity[0]


# -- message -> record ------------------------------------------------------

def python_type(type_: TypeEngine) -> type | None:
    """The Python type a column type holds, None when it says nothing
    (JSON).  A host's ``TypeDecorator`` that names none has its ``impl``'s:
    the wire form follows the stored type, and the decorator's own
    ``process_bind_param``/``process_result_value`` run in SQLAlchemy as
    always."""
    try:
        found = type_.python_type
    except NotImplementedError:
        found = None
    if found in (None, object) and isinstance(type_, TypeDecorator):
        return python_type(type_.impl_instance)
    return None if found is object else found


def _decorated(type_: TypeEngine) -> bool:
    """A host's ``TypeDecorator`` (not one of SQLAlchemy's own, such as
    ``Interval``): its Python values are its own business."""
    return isinstance(type_, TypeDecorator) and type(type_).__module__.split('.')[0] != \
        'sqlalchemy'


def _utc(value: datetime.datetime) -> datetime.datetime:
    """Aware, in UTC; a naive value counts as UTC (what SQLite and MySQL
    hand back for a ``DateTime(timezone=True)`` that we wrote)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=datetime.UTC)
    return value.astimezone(datetime.UTC)


def _naive_utc(value: datetime.datetime) -> datetime.datetime:
    if value.tzinfo is None:
        return value
    return value.astimezone(datetime.UTC).replace(tzinfo=None)


def _decimal(value: Any) -> Any:
    if isinstance(value, decimal.Decimal) or isinstance(value, bool):
        return value
    if isinstance(value, float):
        return decimal.Decimal(repr(value))  # the shortest exact repr, never binary noise
    if isinstance(value, (int, str)):
        return decimal.Decimal(value)
    return value


def _float(value: Any) -> Any:
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _bool(value: Any) -> Any:
    return bool(value) if type(value) is int else value


def _uuid(value: Any) -> Any:
    return uuid.UUID(value) if isinstance(value, str) else value


def canonicalizer(type_: TypeEngine) -> Callable[[Any], Any] | None:
    """How a value of this column type is made what the database reads
    back, on any backend: the naive or aware datetime in UTC as the column
    stores it, a Decimal for a Numeric set from an int or float, a float
    for an int in a Float column, a bool for 0 and 1, a UUID for its
    string.  None where the value needs nothing."""
    if _decorated(type_):
        # The decorator decides what it takes; an instant stays an instant.
        return lambda v: v.astimezone(datetime.UTC) \
            if isinstance(v, datetime.datetime) and v.tzinfo is not None else v
    kind = python_type(type_)
    if kind is datetime.datetime:
        convert = _utc if getattr(type_, 'timezone', False) else _naive_utc
        return lambda v: convert(v) if isinstance(v, datetime.datetime) else v
    if kind is decimal.Decimal:
        return _decimal
    if kind is float:
        return _float
    if kind is bool:
        return _bool
    if kind is uuid.UUID:
        return _uuid
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return lambda v: kind[v] if isinstance(v, str) and v in kind.__members__ else v
    return None


def _column_name(column: Any) -> str:
    table = getattr(column, 'table', None)
    return f'{table.name}.{column.name}' if table is not None else str(column.name)


def from_wire(column: Any, value: Any, dialect: str | None = None) -> Any:
    """A wire value as the Python value of ``column``'s attribute, in the
    form :func:`canonicalizer` gives (so its fingerprint is the one the
    value has once read back).  ``dialect`` (a name) picks the column's
    ``with_variant`` type for that backend: an ``ARRAY`` that is a
    ``Text`` on SQLite refuses a list clearly instead of failing in the
    driver."""
    if value is None:
        return None
    type_ = column.type
    # The canonical form is the declared type's (a variant such as MySQL's
    # DATETIME(fsp=6) of a DateTime(timezone=True) says nothing of zones),
    # as :meth:`Receiver.canonical` sees it.
    convert = canonicalizer(type_)
    if dialect is not None:
        type_ = getattr(type_, '_variant_mapping', {}).get(dialect, type_)
    converted = _from_wire(type_, value, column)
    return converted if convert is None else convert(converted)


def _from_wire(type_: TypeEngine, value: Any, column: Any) -> Any:
    kind = python_type(type_)
    if isinstance(value, (list, dict)):
        if kind is None or _decorated(type_):
            return value  # JSON, or the host's decorator: any JSON value
        if kind is list and isinstance(value, list):
            item_type = getattr(type_, 'item_type', None)
            return value if item_type is None else _items(item_type, value, column)
        if kind is dict and isinstance(value, dict):
            return value
        what = 'array' if isinstance(value, list) else 'object'
        raise WireTypeError(
            f'{_column_name(column)} is a {type_!r} column, which cannot hold the JSON '
            f'{what} the peer sent (from an ARRAY or JSON column of its own?): give both '
            'sides a column of a type that holds it')
    if kind is None:
        return value
    if kind is list or kind is dict:
        raise WireTypeError(
            f'{_column_name(column)} is a {type_!r} column, which cannot hold the '
            f'{type(value).__name__} value the peer sent')
    if type(value) is WireFloat:
        if kind is decimal.Decimal:
            return decimal.Decimal(value.text)  # as written: never through a float
        return float(value)
    if not isinstance(value, str) or kind is str:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if kind is datetime.timedelta and isinstance(value, (int, float)):
            return datetime.timedelta(seconds=value)
        return value
    if kind is datetime.datetime:
        parsed = datetime.datetime.fromisoformat(value)
        if parsed.tzinfo is not None and not _decorated(type_) and \
                not getattr(type_, 'timezone', False):
            parsed = parsed.astimezone(datetime.UTC).replace(tzinfo=None)
        return parsed
    if kind is datetime.date:
        return datetime.date.fromisoformat(value[:10])
    if kind is datetime.time:
        return datetime.time.fromisoformat(value)
    if kind is datetime.timedelta:
        return parse_duration(value)
    if kind is decimal.Decimal:
        return decimal.Decimal(value)
    if kind is uuid.UUID:
        return uuid.UUID(value)
    if kind is bytes:
        return base64.b64decode(value)
    if kind in (int, float):
        return kind(value)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        if value in kind.__members__:
            return kind[value]
        return kind(value)  # a peer that sends values (a gem with values_callable)
    return value


def _items(item_type: TypeEngine, value: list, column: Any) -> list:
    """An ARRAY's items (nested lists for more dimensions) one by one."""
    return [None if item is None else
            _items(item_type, item, column) if isinstance(item, list) else
            _from_wire(item_type, item, column) for item in value]


#: Characters of a body that hold its record name (``{"`` and a name of at
#: most 64): what to read of a stored body to tell its record.
NAME_PREFIX = 80


def body_name(body: str) -> str | None:
    """The record name a stored body starts with (``{"name":{...}}``),
    without decoding the body (or with only its start at hand)."""
    if not body.startswith('{"'):
        return None
    end = body.find('"', 2)
    return body[2:end] if end > 2 else None


class WireFloat(float):
    """A JSON number with a fraction or exponent as a body spelt it: a
    float, which also keeps its text, so that a Numeric column takes the
    exact decimal a peer wrote (``0.10``) and not the nearest double.
    Integers need nothing of the kind: Python's ``json`` parses them
    exactly, however large (peers must too: a BigInteger beyond 2**53
    crosses as a JSON integer)."""
    __slots__ = ('text',)

    def __new__(cls, text: str) -> WireFloat:
        number = super().__new__(cls, text)
        number.text = text
        return number


def decode_body(body: str) -> tuple[str, dict[str, Any]]:
    """Split a body into (record name, attributes); ValueError if malformed."""
    data = json.loads(body, parse_float=WireFloat)
    if not (isinstance(data, dict) and len(data) == 1):
        raise ValueError('body must be a JSON object with exactly one record name')
    (name, attributes), = data.items()
    if not isinstance(attributes, dict):
        raise ValueError(f'attributes of {name!r} must be a JSON object')
    return name, attributes
