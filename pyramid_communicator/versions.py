"""Versions of synced records: hybrid logical clocks, version vectors and
per-attribute stamps, made for any number of apps.

Every change of a synced record is an *edit* stamped ``(hlc, app)``: the
app that made it and a hybrid logical clock, the wall clock in
microseconds pushed past every stamp the record already carries.  So an
edit made after another was seen always has the greater hlc, however far
apart the hosts' clocks are, and ``(hlc, app)`` orders every two edits of
a record the same way on every side.

A record's version is

- its *clock*, a version vector ``{app: highest hlc of that app's edits
  merged into this state}``: whether the other side had seen an edit when
  it made its own (causally newer) or not (concurrent);
- a *stamp* per attribute: the edit that wrote the attribute's value;
- a *deleted* stamp once the record is a tombstone.

Each identity (origin, original id) also has a *life*, kept beside the
version: 0, and one more each time the origin app hands the id of a
deleted record to a new record (SQLite does that), so that the new record
is never taken for the deleted one.  A message carries the life of the
identity it addresses.

Stored versions name this app ``''`` (as ``outbound_messages.origin``
NULL means "here"): the add-on learns its own name from the settings, but
``publish`` runs in any session of the host.  :func:`to_wire` and
:func:`from_wire` translate at the boundary.

Nothing here touches a database.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Any

#: This app, in stored versions.
HERE = ''
#: Upper bound for hlc values on the wire (a hostile peer must not make
#: our clocks overflow a BIGINT or a JSON double).
MAX_HLC = 2 ** 62

#: A peer's clock may be minutes off, not days: a version further ahead
#: of ours than this is refused, so that no peer can push our clocks
#: towards :data:`MAX_HLC`.
FUTURE_LIMIT = 24 * 3600 * 1_000_000

Stamp = tuple[int, str]


def now_hlc() -> int:
    return time.time_ns() // 1000


def covered(stamp: Stamp | None, clock: dict[str, int]) -> bool:
    """Had a side whose version vector is ``clock`` seen the edit ``stamp``?
    ``None`` stands for "no edit" (the record's state before versions),
    which every side has seen."""
    if stamp is None:
        return True
    return clock.get(stamp[1], 0) >= stamp[0]


def merge_clocks(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    merged = dict(a)
    for app, hlc in b.items():
        if hlc > merged.get(app, 0):
            merged[app] = hlc
    return merged


#: Encoders made once: ``json.dumps`` with options builds a new encoder
#: on every call, which costs more than encoding a small value.
_canonical = json.JSONEncoder(sort_keys=True, separators=(',', ':'),
                              ensure_ascii=False).encode
_compact_sorted = json.JSONEncoder(sort_keys=True, separators=(',', ':')).encode
_blake2b = hashlib.blake2b
_SCALAR_JSON = {type(None): lambda v: 'null', bool: lambda v: 'true' if v else 'false',
                int: int.__repr__, str: json.encoder.encode_basestring}


def digest(value: Any) -> str:
    """A short fingerprint of an attribute's wire value: whether the host
    changed it since the last stamp, without keeping a copy of it."""
    # Strings, integers, booleans and None (most values) encoded directly,
    # exactly as the canonical JSON encoding does; anything else through it.
    scalar = _SCALAR_JSON.get(type(value))
    encoded = scalar(value) if scalar is not None else _canonical(value)
    return _blake2b(encoded.encode('utf-8'), digest_size=8).hexdigest()


@dataclasses.dataclass
class Version:
    """A record's version as this app keeps it (``''`` is this app)."""
    clock: dict[str, int] = dataclasses.field(default_factory=dict)
    #: attribute -> (hlc, app, digest of the value that edit wrote)
    stamps: dict[str, tuple[int, str, str]] = dataclasses.field(default_factory=dict)
    deleted: Stamp | None = None
    #: For a natural-key tombstone: per app, its latest delete of the key.
    deletes: dict[str, int] = dataclasses.field(default_factory=dict)

    def deletes_seen(self, clock: dict[str, int]) -> bool:
        """Had a side with this clock seen every delete this tombstone keeps?"""
        if self.deletes:
            return all(clock.get(app, 0) >= hlc for app, hlc in self.deletes.items())
        return covered(self.deleted, clock)

    def with_delete(self, other: Version) -> Version:
        """This tombstone merged with another delete of the same key."""
        deletes = dict(self.deletes)
        for tomb in (self, other):
            if tomb.deleted is not None:
                app, hlc = tomb.deleted[1], tomb.deleted[0]
                deletes[app] = max(deletes.get(app, 0), hlc)
            for app, hlc in tomb.deletes.items():
                deletes[app] = max(deletes.get(app, 0), hlc)
        latest = max((d for d in (self.deleted, other.deleted) if d), default=None)
        return Version(clock=merge_clocks(self.clock, other.clock), deleted=latest,
                       deletes=deletes)

    def stamp(self, attribute: str) -> Stamp | None:
        found = self.stamps.get(attribute)
        return None if found is None else (found[0], found[1])

    def next_hlc(self) -> int:
        """The hlc of a new edit here: later than the wall clock's now and
        than every edit this state has seen."""
        return max(now_hlc(), max(self.clock.values(), default=0) + 1)

    def edit(self, fingerprints: dict[str, str]) -> bool:
        """Stamp the attributes whose fingerprint (see
        :func:`.records.fingerprint`) differs from the one last stamped, as
        one local edit; False if none did."""
        changed = {key: fp for key, fp in fingerprints.items()
                   if key not in self.stamps or self.stamps[key][2] != fp}
        if not changed:
            return False
        hlc = self.next_hlc()
        for key, fp in changed.items():
            self.stamps[key] = (hlc, HERE, fp)
        self.clock[HERE] = hlc
        return True

    def delete(self) -> Stamp:
        hlc = self.next_hlc()
        self.clock[HERE] = hlc
        self.deleted = (hlc, HERE)
        return self.deleted

    # -- storage (JSON in communicator_mappings) -------------------------------

    def dumps(self) -> str:
        data = {'clock': self.clock,
                'stamps': {k: list(v) for k, v in self.stamps.items()},
                'deleted': list(self.deleted) if self.deleted else None}
        if self.deletes:
            data['deletes'] = self.deletes
        return _compact_sorted(data)

    @classmethod
    def loads(cls, text: str | None) -> Version:
        if not text:
            return cls()
        data = json.loads(text)
        return cls(dict(data.get('clock') or {}),
                   {k: (v[0], v[1], v[2]) for k, v in (data.get('stamps') or {}).items()},
                   tuple(data['deleted']) if data.get('deleted') else None,
                   dict(data.get('deletes') or {}))


def _name(app: str, local_name: str) -> str:
    return local_name if app == HERE else app


def _here(app: str, local_name: str) -> str:
    return HERE if app == local_name else app


def to_wire(version: Version, local_name: str, life: int = 0) -> dict[str, Any]:
    """The ``version`` of a message: clock, stamps (or the deletion) and
    the identity's life, with this app named."""
    data: dict[str, Any] = {
        'clock': {_name(app, local_name): hlc for app, hlc in sorted(version.clock.items())}}
    if life:
        data['life'] = life
    if version.deleted is not None:
        data['deleted'] = [version.deleted[0], _name(version.deleted[1], local_name)]
    else:
        data['stamps'] = {key: [hlc, _name(app, local_name)]
                          for key, (hlc, app, _) in sorted(version.stamps.items())}
    return data


@dataclasses.dataclass(frozen=True)
class Incoming:
    """A received message's version, with this app called ``''`` again."""
    clock: dict[str, int]
    stamps: dict[str, Stamp]
    deleted: Stamp | None
    life: int = 0


def latest_hlc(incoming: Incoming) -> int:
    hlcs = list(incoming.clock.values()) + [hlc for hlc, _ in incoming.stamps.values()]
    if incoming.deleted is not None:
        hlcs.append(incoming.deleted[0])
    return max(hlcs, default=0)


def from_wire(data: dict[str, Any], local_name: str) -> Incoming:
    clock = {_here(app, local_name): hlc for app, hlc in data.get('clock', {}).items()}
    stamps = {key: (hlc, _here(app, local_name))
              for key, (hlc, app) in (data.get('stamps') or {}).items()}
    deleted = data.get('deleted')
    if deleted is not None:
        deleted = (deleted[0], _here(deleted[1], local_name))
    return Incoming(clock, stamps, deleted, data.get('life') or 0)


def valid_wire_version(data: Any) -> bool:
    """Is this a well-formed ``version`` of a message?  (Every message of
    every batch passes here, on both sides: checked in one loop, with
    ``type() is`` tests, which also keep ``true`` from passing for an
    integer.)"""
    if type(data) is not dict or not data.keys() <= _VERSION_KEYS:
        return False
    if 'life' in data and not _hlc(data['life']):
        return False
    clock = data.get('clock')
    if type(clock) is not dict or len(clock) > MAX_CLOCK_APPS:
        return False
    for app, hlc in clock.items():
        if not (type(app) is str and 0 < len(app) <= 64 and _hlc(hlc)):
            return False
    stamps = data.get('stamps')
    if stamps is not None:
        if type(stamps) is not dict or len(stamps) > 1000:
            return False
        for key, stamp in stamps.items():
            if not (type(key) is str and 0 < len(key) <= 255 and _stamp(stamp)):
                return False
    deleted = data.get('deleted')
    return deleted is None or (_stamp(deleted) and stamps is None)


_VERSION_KEYS = frozenset({'clock', 'stamps', 'deleted', 'life'})
#: Apps a version may name: a pair, or a central with its facades.  (Apps
#: the receiver does not know are refused anyway, see :mod:`.trust`.)
MAX_CLOCK_APPS = 64


def _hlc(value: Any) -> bool:
    return type(value) is int and 0 <= value < MAX_HLC


def _stamp(value: Any) -> bool:
    return (type(value) is list and len(value) == 2 and type(value[0]) is int
            and 0 <= value[0] < MAX_HLC and type(value[1]) is str and 0 < len(value[1]) <= 64)


def named(stamp: Stamp | None, local_name: str) -> Stamp | None:
    """A stamp with this app named, for ordering and for conflict records."""
    return None if stamp is None else (stamp[0], _name(stamp[1], local_name))
