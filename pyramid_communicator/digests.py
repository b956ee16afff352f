"""Hashes of synced records over ranges of their identities, the same on
both sides, for :mod:`.verify` to find where two databases differ
without sending the tables.

A record is compared by its *canonical identity*, the one both sides
spell alike: ``(origin app name, original id)``, with this app's own
origin (``''`` in ``communicator_mappings``) named by its
``communicator.name``, as the wire does.  A record merged by
``match_on`` has a row per identity on both sides and is compared under
each.

A *range* is ``(origin, lo, hi)``: the identities of one origin with
``lo <= original_id < hi`` (``None``: unbounded).  Its *summary* is
``(count, digest, low, high)``: how many live records it holds, a hash of
their ``(id, record digest)`` in identity order, and its smallest and
largest id (for the next split).  A record's digest hashes its crossing
columns as canonical wire values, foreign keys as the canonical identity
of the record they point at (never a local id, which differs per side).

Every scan is one streamed query per run of adjacent ranges, ordered by
identity, read in partitions: memory stays that of a partition however
large the table.  Nothing here does network I/O.
"""
from __future__ import annotations

import dataclasses
import decimal
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import and_, inspect, select
from sqlalchemy.engine import Connection

from . import keys, link_verify
from .models import communicator_mappings
from .records import Receiver, to_wire
from .versions import HERE, Version, digest
from .versions import to_wire as version_to_wire

M = communicator_mappings.c

#: Sub-ranges a differing range is split into.
FANOUT = 16
#: A differing range of at most this many records on either side is
#: compared record by record.
LEAF = 16
#: Ranges (or identities, per :data:`LEAF`) one request may name: a
#: request is bounded work for the side that answers it.
MAX_RANGES = 256
#: Records one range of a ``records`` request may hold: a leaf the asker
#: saw holding more is refused rather than read whole.
MAX_LEAF_RECORDS = 4 * LEAF
#: Origins a model's records may have (a pair, or a central with its
#: facades; as many as a version may name).
MAX_ORIGINS = 64
#: Rows read per partition of a streamed scan.
PARTITION = 500
#: A foreign key to a record that was never shared has no identity both
#: sides know; it is compared as this marker, never as a local id.
UNSHARED = ['unshared']

Identity = tuple[str, int]


@dataclasses.dataclass(frozen=True, order=True)
class Range:
    origin: str
    lo: int | None = None
    hi: int | None = None

    def to_json(self) -> list:
        return [self.origin, self.lo, self.hi]

    def width(self, low: int, high: int) -> int:
        lo = low if self.lo is None else max(self.lo, low)
        hi = high + 1 if self.hi is None else min(self.hi, high + 1)
        return hi - lo


@dataclasses.dataclass(frozen=True)
class Summary:
    count: int = 0
    digest: str = ''
    low: int | None = None
    high: int | None = None

    def to_json(self) -> list:
        return [self.count, self.digest, self.low, self.high]

    def same(self, other: Summary) -> bool:
        return self.count == other.count and self.digest == other.digest


EMPTY = Summary()


@dataclasses.dataclass
class Entry:
    """A live record as compared: its canonical wire values and version."""
    identity: Identity
    values: dict[str, Any]
    version: dict[str, Any] | None
    #: Of its travelling collections: relationship -> the kept changes of
    #: its links (:func:`.link_verify.stamps`), for ``--repair`` to settle
    #: a link by; not compared.
    stamps: dict[str, list] = dataclasses.field(default_factory=dict)

    def to_json(self) -> list:
        found = [list(self.identity), self.values, self.version]
        return found + [self.stamps] if self.stamps else found


def canonical_origin(stored: str, local_name: str) -> str:
    return local_name if stored == HERE else stored


def stored_origin(canonical: str, local_name: str) -> str:
    return HERE if canonical == local_name else canonical


def canonical_value(value: Any) -> Any:
    """A value as compared: its wire value, numbers of one value equal
    whatever their scale (``1.5`` and ``1.50``), as versions see them."""
    if isinstance(value, decimal.Decimal) and value.is_finite():
        value = value.normalize()
    return to_wire(value)


def record_digest(values: dict[str, Any]) -> str:
    return digest(values)


def split(rng: Range, ours: Summary, theirs: Summary) -> list[Range]:
    """Up to :data:`FANOUT` sub-ranges covering the ids either side holds
    in ``rng``, of equal width: ids handed out in sequence fall evenly."""
    lows = [s.low for s in (ours, theirs) if s.low is not None]
    highs = [s.high for s in (ours, theirs) if s.high is not None]
    lo = min(lows) if rng.lo is None else max(rng.lo, min(lows))
    hi = max(highs) + 1 if rng.hi is None else min(rng.hi, max(highs) + 1)
    width = max(1, -(-(hi - lo) // FANOUT))
    return [Range(rng.origin, start, min(start + width, hi)) for start in range(lo, hi, width)]


class Scanner:
    """Reads one model's synced records on ``connection``, as compared."""

    def __init__(self, connection: Connection, receiver: Receiver, local_name: str) -> None:
        self.connection = connection
        self.receiver = receiver
        self.local_name = local_name
        mapper = inspect(receiver.cls)
        # A hierarchy's records are compared with the columns of every
        # class in it (NULL where a record's class has none): the same on
        # both sides, whatever class each record is.
        self.columns = receiver.all_columns()
        self.keys = list(self.columns)
        self.references = receiver.all_references()
        #: Travelling collections it owns, compared as an attribute each
        #: (:mod:`.link_verify`); their rows carry the owner's local id last.
        self.links = link_verify.owned(receiver)
        self.table = table = mapper.local_table
        #: A keyed model's records are joined to their mappings here, by
        #: their key's text (:mod:`.keys`), not in SQL: a key of any type
        #: compares alike on every backend.
        self.keyed = receiver.keyed
        self.joined = None
        if not self.keyed:
            self.joined = communicator_mappings.join(table, mapper.primary_key[0] == M.local_id)
            for sub in mapper.self_and_descendants:
                if sub is not mapper and sub.local_table is not sub.inherits.local_table:
                    self.joined = self.joined.outerjoin(sub.local_table, sub.inherit_condition)

    # -- queries ---------------------------------------------------------------

    def _select(self, with_values: bool = True) -> Any:
        columns = [M.origin, M.original_id]
        if self.keyed:
            return (select(*columns, M.version, M.local_key).select_from(communicator_mappings)
                    .where(M.name == self.receiver.name, M.local_id.is_not(None)))
        if with_values:
            columns += [M.version] + [column.label(f'c{i}') for i, column in
                                      enumerate(self.columns.values())]
            if self.links:
                columns.append(M.local_id)
        return (select(*columns).select_from(self.joined)
                .where(M.name == self.receiver.name, M.local_id.is_not(None)))

    def _rows(self, statement: Any) -> Iterator[Sequence[Any]]:
        """Rows of a streamed query, a partition at a time."""
        result = self.connection.execute(
            statement, execution_options={'stream_results': True, 'yield_per': PARTITION})
        try:
            for partition in result.partitions(PARTITION):
                yield self._join(partition) if self.keyed else partition
        finally:
            result.close()

    def _records_by_key(self, key_texts: list[str]) -> dict[str, tuple]:
        """Key text -> the crossing values of the keyed records named."""
        positions = [self.keys.index(key) for key in self.receiver.primary_key]
        found = {}
        for start in range(0, len(key_texts), PARTITION):
            chunk = key_texts[start:start + PARTITION]
            statement = (select(*self.columns.values())
                         .where(keys.where(self.receiver, chunk)))
            for row in self.connection.execute(statement):
                values = tuple(self.receiver.canonical(self.keys[i], row[i]) for i in positions)
                found[keys.text(values)] = tuple(row)
        return found

    def _join(self, partition: Sequence[Any]) -> list[tuple]:
        """Mapping rows (origin, original id, version, local key) as the
        SQL join gives them for other models: with their record's values,
        those without a record left out."""
        records = self._records_by_key(sorted({row[3] for row in partition}))
        return [(row[0], row[1], row[2], *records[row[3]])
                for row in partition if row[3] in records]

    def _values(self, partition: Sequence[Any]) -> list[dict[str, Any]]:
        """The canonical values of a partition's rows, foreign keys as
        canonical identities (one lookup per referenced model)."""
        identities: dict[str, dict[int, list]] = {}
        for key, target in self.references.items():
            index = self.keys.index(key)
            ids = {row[3 + index] for row in partition} - {None}
            identities[key] = self._identities_of(target.name, ids)
        found = []
        for row in partition:
            values = {}
            for index, key in enumerate(self.keys):
                value = row[3 + index]
                if key in identities and value is not None:
                    values[key] = identities[key].get(value, UNSHARED)
                else:
                    values[key] = canonical_value(self.receiver.canonical(key, value))
            found.append(values)
        for link in self.links:  # a query per relationship for the partition
            owner_ids = [row[-1] for row in partition]
            members = link_verify.members(self.connection, link, owner_ids, self.local_name)
            for row, values in zip(partition, found, strict=True):
                values[link.key] = members.get(row[-1], [])
        return found

    def _identities_of(self, name: str, local_ids: set[int]) -> dict[int, list]:
        """Local id -> canonical identity, the smallest of a record's named
        identities (a rule both sides apply alike)."""
        best: dict[int, list] = {}
        ids = sorted(local_ids)
        for start in range(0, len(ids), 500):
            for row in self.connection.execute(
                    select(M.local_id, M.origin, M.original_id)
                    .where(M.name == name, M.local_id.in_(ids[start:start + 500]))):
                identity = [canonical_origin(row.origin, self.local_name), row.original_id]
                if row.local_id not in best or identity < best[row.local_id]:
                    best[row.local_id] = identity
        return best

    def _where(self, rng: Range) -> Any:
        condition = M.origin == stored_origin(rng.origin, self.local_name)
        if rng.lo is not None:
            condition = and_(condition, M.original_id >= rng.lo)
        if rng.hi is not None:
            condition = and_(condition, M.original_id < rng.hi)
        return condition

    # -- summaries ---------------------------------------------------------------

    def origins(self) -> dict[str, Summary]:
        """A summary of each origin's records: one scan of the model."""
        found: dict[str, Summary] = {}
        statement = self._select().order_by(M.origin, M.original_id)
        current: str | None = None
        hasher = None
        count, low, high = 0, None, None
        for partition in self._rows(statement):
            for row, values in zip(partition, self._values(partition), strict=True):
                origin = canonical_origin(row[0], self.local_name)
                if origin != current:
                    if current is not None:
                        found[current] = Summary(count, hasher.hexdigest(), low, high)
                    if len(found) >= MAX_ORIGINS:
                        raise ValueError(f'{self.receiver.name} has records of more than '
                                         f'{MAX_ORIGINS} origins')
                    current, hasher, count, low = origin, _hasher(), 0, row[1]
                hasher.update(f'{row[1]}:{record_digest(values)};'.encode())
                count += 1
                high = row[1]
        if current is not None:
            found[current] = Summary(count, hasher.hexdigest(), low, high)
        return found

    def summaries(self, ranges: Sequence[Range]) -> list[Summary]:
        """A summary per range (disjoint ranges, any order): one streamed
        query per run of adjacent ranges of one origin."""
        found: dict[Range, Summary] = {}
        for run in _runs(ranges):
            span = Range(run[0].origin, run[0].lo, run[-1].hi)
            statement = self._select().where(self._where(span)).order_by(M.original_id)
            position = 0
            state = _Running()
            for partition in self._rows(statement):
                for row, values in zip(partition, self._values(partition), strict=True):
                    original_id = row[1]
                    while run[position].hi is not None and original_id >= run[position].hi:
                        found[run[position]] = state.summary()
                        position += 1
                        state = _Running()
                    state.add(original_id, values)
            found[run[position]] = state.summary()
            for rest in run[position + 1:]:
                found[rest] = EMPTY
        return [found[rng] for rng in ranges]

    # -- records -----------------------------------------------------------------

    def records(self, ranges: Sequence[Range], limit: int | None = None) -> list[Entry]:
        """The live records of these ranges, with values and versions;
        ValueError if a range holds more than ``limit``."""
        entries: list[Entry] = []
        for run in _runs(ranges):
            span = Range(run[0].origin, run[0].lo, run[-1].hi)
            statement = self._select().where(self._where(span)).order_by(M.original_id)
            if limit is not None:
                statement = statement.limit(limit * len(run) + 1)
            found = []
            owners: dict[int, Entry] = {}
            for partition in self._rows(statement):
                for row, values in zip(partition, self._values(partition), strict=True):
                    version = None
                    if row[2]:
                        version = version_to_wire(Version.loads(row[2]), self.local_name)
                    found.append(Entry((span.origin, row[1]), values, version))
                    if self.links:
                        owners[row[-1]] = found[-1]
            for link in self.links:
                kept = link_verify.stamps(self.connection, link, owners, self.local_name)
                for owner_id, rows in kept.items():
                    owners[owner_id].stamps[link.key] = rows
            if limit is not None:
                position = 0
                counts = [0] * len(run)
                for entry in found:
                    while run[position].hi is not None and entry.identity[1] >= run[position].hi:
                        position += 1
                    counts[position] += 1
                    if counts[position] > limit:
                        raise ValueError(f'a range holds more than {limit} records')
            entries += found
        return entries

    def states(self, identities: Iterable[Identity]) -> dict[Identity, str]:
        """Of identities without a live record here: ``'deleted'`` (a
        tombstone says so) or ``'stale'`` (a live mapping whose record
        is gone, deleted outside the add-on); absent when never known."""
        by_origin: dict[str, list[int]] = {}
        for origin, original_id in identities:
            by_origin.setdefault(origin, []).append(original_id)
        found: dict[Identity, str] = {}
        if self.keyed:
            for origin, ids in by_origin.items():
                for start in range(0, len(ids), 500):
                    rows = self.connection.execute(
                        select(M.original_id, M.local_id, M.local_key)
                        .where(M.name == self.receiver.name,
                               M.origin == stored_origin(origin, self.local_name),
                               M.original_id.in_(ids[start:start + 500]))).all()
                    live = self._records_by_key(sorted({r[2] for r in rows if r[2]}))
                    for row in rows:
                        if row[1] is None:
                            found[(origin, row[0])] = 'deleted'
                        elif row[2] not in live:
                            found[(origin, row[0])] = 'stale'
            return found
        table = self.table
        pk = inspect(self.receiver.cls).primary_key[0]
        for origin, ids in by_origin.items():
            for start in range(0, len(ids), 500):
                statement = (select(M.original_id, M.local_id, pk)
                             .select_from(communicator_mappings.outerjoin(
                                 table, pk == M.local_id))
                             .where(M.name == self.receiver.name,
                                    M.origin == stored_origin(origin, self.local_name),
                                    M.original_id.in_(ids[start:start + 500])))
                for row in self.connection.execute(statement):
                    if row[1] is None:
                        found[(origin, row[0])] = 'deleted'
                    elif row[2] is None:
                        found[(origin, row[0])] = 'stale'
        return found

    def local_ids(self, identities: Iterable[Identity]) -> dict[Identity, tuple[int, str | None]]:
        """The local records of live identities here: their local id and
        ``local_key`` (:func:`.keys.get` finds the record)."""
        found: dict[Identity, tuple[int, str | None]] = {}
        for origin, original_id in identities:
            row = self.connection.execute(
                select(M.local_id, M.local_key).where(
                    M.name == self.receiver.name,
                    M.origin == stored_origin(origin, self.local_name),
                    M.original_id == original_id, M.local_id.is_not(None))).first()
            if row is not None:
                found[(origin, original_id)] = (row.local_id, row.local_key)
        return found


class _Running:
    """The summary of a range being read, record by record."""

    def __init__(self) -> None:
        self.count = 0
        self.hasher = _hasher()
        self.low: int | None = None
        self.high: int | None = None

    def add(self, original_id: int, values: dict[str, Any]) -> None:
        self.count += 1
        self.hasher.update(f'{original_id}:{record_digest(values)};'.encode())
        if self.low is None:
            self.low = original_id
        self.high = original_id

    def summary(self) -> Summary:
        if not self.count:
            return EMPTY
        return Summary(self.count, self.hasher.hexdigest(), self.low, self.high)


def _hasher() -> Any:
    return hashlib.blake2b(digest_size=12)


def _runs(ranges: Sequence[Range]) -> list[list[Range]]:
    """Ranges grouped into runs of adjacent ones (of one origin, each
    starting where the one before ends), in identity order."""
    runs: list[list[Range]] = []
    for rng in sorted(ranges, key=lambda r: (r.origin, r.lo is not None, r.lo or 0)):
        last = runs[-1][-1] if runs else None
        if (last is not None and last.origin == rng.origin and last.hi is not None
                and last.hi == rng.lo):
            runs[-1].append(rng)
        else:
            runs.append([rng])
    return runs
