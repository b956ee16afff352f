"""``pcommunicate --verify``: do the two databases hold the same synced
data?  Drift that never went through the queues (SQL run by hand, a
host migration's bug, a partial restore) shows up nowhere else.

Central drives a Merkle-style descent over ranges of canonical
identities (see :mod:`.digests`), as pgEdge ACE's table-diff or
Cassandra's repair do: both sides summarise the same ranges, central
compares, splits only the ranges that differ into :data:`.digests.FANOUT`
sub-ranges, and once a differing range holds at most
:data:`.digests.LEAF` records on either side, fetches the peer's records
of it and compares them one by one.  Traffic grows with the number of
differences times the depth (the log of the table's size), not with the
table.

The peer answers ``POST /verify.json`` (:func:`answer`), a request that
is hostile input like any other: it is checked whole by
:func:`parse_request` and bounded (:data:`.digests.MAX_RANGES`).  Local
scans run in short read transactions of their own, between requests,
never around one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from . import digests, link_verify
from .client import PeerError
from .digests import LEAF, MAX_RANGES, Entry, Identity, Range, Scanner, Summary
from .records import UnknownRecord, _by_name, receiver_for
from .settings import is_valid_name
from .wire import WireError, parse_json

log = logging.getLogger(__name__)

#: Operations of ``POST /verify.json``.
OPS = ('origins', 'digests', 'records', 'republish', 'relink')
#: Leaf ranges per ``records`` request: a reply of at most this many times
#: :data:`.digests.MAX_LEAF_RECORDS` records.
LEAF_RANGES = 32
#: Identities one ``records`` request may ask about, or one ``republish``
#: name.
MAX_IDENTITIES = LEAF_RANGES * digests.MAX_LEAF_RECORDS


# -- the peer's side: one request ------------------------------------------------

@dataclasses.dataclass(frozen=True)
class VerifyRequest:
    name: str
    op: str
    ranges: tuple[Range, ...] = ()
    identities: tuple[Identity, ...] = ()
    #: ``relink``: (relationship, owner identity, target identity).
    links: tuple[tuple, ...] = ()


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2 ** 63


def _identity(item: Any) -> Identity:
    if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
            and is_valid_name(item[0]) and _int(item[1])):
        raise WireError('an identity is [origin name, integer id]')
    return item[0], item[1]


def _range(item: Any) -> Range:
    if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
            and is_valid_name(item[0])
            and all(bound is None or _int(bound) for bound in item[1:])):
        raise WireError('a range is [origin name, integer or null, integer or null]')
    if item[1] is not None and item[2] is not None and item[1] >= item[2]:
        raise WireError('a range is empty ([origin, lo, hi] with lo < hi)')
    return Range(*item)


def parse_request(raw: bytes) -> VerifyRequest:
    """A ``/verify.json`` request checked whole; :class:`.wire.WireError`
    (a 400, one line) for anything else."""
    data = parse_json(raw)
    if not isinstance(data, dict) or not data.keys() <= {'name', 'op', 'ranges',
                                                          'identities', 'links'}:
        raise WireError('expected {"name", "op", "ranges", "identities" or "links"}')
    name, op = data.get('name'), data.get('op')
    if not isinstance(name, str) or len(name) > 64:
        raise WireError('"name" must be a record name')
    try:
        receiver_for(name)
    except UnknownRecord:
        raise WireError(f'no model receives_from {name[:64]!r}') from None
    if op not in OPS:
        raise WireError(f'"op" must be one of {", ".join(OPS)}')
    ranges = data.get('ranges', [])
    identities = data.get('identities', [])
    if not isinstance(ranges, list) or len(ranges) > MAX_RANGES:
        raise WireError(f'"ranges" must be a list of at most {MAX_RANGES}')
    if not isinstance(identities, list) or len(identities) > MAX_IDENTITIES:
        raise WireError(f'"identities" must be a list of at most {MAX_IDENTITIES}')
    parsed = tuple(_range(item) for item in ranges)
    if op == 'records' and len(parsed) > LEAF_RANGES:
        raise WireError(f'at most {LEAF_RANGES} ranges per records request')
    for before, after in zip(sorted(parsed), sorted(parsed)[1:], strict=False):
        if before.origin == after.origin and (
                before.hi is None or after.lo is None or after.lo < before.hi):
            raise WireError('ranges overlap')
    try:
        relinks = link_verify.check_items(data.get('links', []), name, MAX_IDENTITIES)
    except ValueError as exc:
        raise WireError(str(exc)) from None
    return VerifyRequest(name, op, parsed, tuple(_identity(item) for item in identities),
                         relinks)


def answer(session: Session, local_name: str, request: VerifyRequest) -> dict[str, Any]:
    """This side's answer to a checked request, read (or, for
    ``republish``, written) in ``session``'s transaction."""
    receiver = receiver_for(request.name)
    if request.op == 'republish':
        from .repair import republish
        done, skipped = republish(session, receiver, request.identities, local_name)
        return {'republished': done, 'skipped': [list(i) for i in skipped]}
    if request.op == 'relink':
        done, skipped = link_verify.relink(session, receiver, request.links, local_name)
        return {'relinked': done, 'skipped': skipped}
    scanner = Scanner(session.connection(), receiver, local_name)
    if request.op == 'origins':
        return {'origins': {origin: summary.to_json()
                            for origin, summary in scanner.origins().items()}}
    if request.op == 'digests':
        return {'digests': [s.to_json() for s in scanner.summaries(request.ranges)]}
    try:
        entries = scanner.records(request.ranges, digests.MAX_LEAF_RECORDS)
    except ValueError as exc:
        raise WireError(str(exc)) from None
    states = scanner.states(request.identities)
    return {'records': [entry.to_json() for entry in entries],
            'states': [[list(identity), state] for identity, state in states.items()]}


# -- central's side: the descent -------------------------------------------------

@dataclasses.dataclass
class Difference:
    """A record whose synced attributes differ, or that one side lacks."""
    name: str
    identity: Identity
    local: Entry | None
    peer: Entry | None
    #: Of the side without the record: 'deleted' (a tombstone), 'stale'
    #: (its mapping is live, the record gone) or None (never known).
    local_state: str | None = None
    peer_state: str | None = None

    def as_json(self, local_name: str, peer_name: str) -> dict[str, Any]:
        data = {'name': self.name, 'identity': list(self.identity),
                local_name: self.local.values if self.local else 'missing',
                peer_name: self.peer.values if self.peer else 'missing'}
        deleted = [name for name, state in ((local_name, self.local_state),
                                            (peer_name, self.peer_state))
                   if state == 'deleted']
        if deleted:
            data['deleted_on'] = deleted
        differing = self.links()
        if differing:
            data['links'] = {key: {local_name: self.local.values.get(key, []) if self.local
                                   else 'missing',
                                   peer_name: self.peer.values.get(key, []) if self.peer
                                   else 'missing'}
                             for key in differing}
        return data

    def links(self) -> list[str]:
        """The travelling collections (:mod:`.link_verify`) whose members
        differ, by relationship."""
        try:
            owned = link_verify.owned(receiver_for(self.name))
        except UnknownRecord:
            return []
        found = []
        for link in owned:
            ours = self.local.values.get(link.key, []) if self.local else []
            theirs = self.peer.values.get(link.key, []) if self.peer else []
            if ours != theirs:
                found.append(link.key)
        return found


@dataclasses.dataclass
class Report:
    local_name: str
    peer_name: str
    names: list[str]
    differences: list[Difference] = dataclasses.field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    requests: int = 0
    #: Ranges whose summaries were compared, and records compared one by one.
    ranges: int = 0
    records: int = 0
    seconds: float = 0.0

    @property
    def bytes(self) -> int:
        return self.bytes_sent + self.bytes_received

    def as_json(self) -> dict[str, Any]:
        return {'equal': not self.differences, 'local': self.local_name,
                'peer': self.peer_name, 'names': self.names,
                'differences': [d.as_json(self.local_name, self.peer_name)
                                for d in self.differences],
                'bytes': self.bytes, 'bytes_sent': self.bytes_sent,
                'bytes_received': self.bytes_received, 'requests': self.requests,
                'ranges': self.ranges, 'records': self.records,
                'seconds': round(self.seconds, 3)}

    def summary(self) -> str:
        what = 'equal' if not self.differences else f'{len(self.differences)} difference(s)'
        return (f'{what} in {", ".join(self.names) or "no models"} '
                f'(bytes={self.bytes} requests={self.requests} ranges={self.ranges} '
                f'records={self.records} seconds={self.seconds:.2f})')


def all_names() -> list[str]:
    """Every record name a model ``receives_from``, in order."""
    return sorted(_by_name)


class Verifier:
    """Central's side of a verify: local scans on ``bind``, the peer's
    through ``client`` (:meth:`.client.Client.verify_request`)."""

    def __init__(self, bind: Engine, local_name: str, client: Any) -> None:
        self.bind = bind
        self.local_name = local_name
        self.client = client
        self.peer_name = '?'

    def run(self, names: Sequence[str]) -> Report:
        started = time.monotonic()
        sent, received, requests = (self.client.verify_bytes_sent,
                                    self.client.verify_bytes_received,
                                    self.client.verify_requests)
        report = Report(self.local_name, self.peer_name, list(names))
        for name in names:
            try:
                report.differences += self._compare(name, report)
            except BadReply as exc:  # a failed exchange, as any other
                raise PeerError(f'{self.client.verify_url} sent an invalid reply: '
                                f'{exc}') from None
        report.peer_name = self.peer_name
        report.bytes_sent = self.client.verify_bytes_sent - sent
        report.bytes_received = self.client.verify_bytes_received - received
        report.requests = self.client.verify_requests - requests
        report.seconds = time.monotonic() - started
        return report

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        reply, self.peer_name = self.client.verify_request(request)
        return reply

    def _local(self, name: str, work: Any) -> Any:
        """Run ``work(scanner)`` in a read transaction of its own."""
        with self.bind.connect() as connection:
            return work(Scanner(connection, receiver_for(name), self.local_name))

    def _compare(self, name: str, report: Report) -> list[Difference]:
        ours = self._local(name, lambda scanner: scanner.origins())
        theirs = _origins(self._ask({'name': name, 'op': 'origins'}))
        pending = [(Range(origin), ours.get(origin, digests.EMPTY),
                    theirs.get(origin, digests.EMPTY))
                   for origin in sorted(set(ours) | set(theirs))]
        report.ranges += len(pending)
        pending = [item for item in pending if not item[1].same(item[2])]
        leaves: list[Range] = []
        while pending:
            children: list[Range] = []
            for rng, mine, peer in pending:
                low = min(s.low for s in (mine, peer) if s.low is not None)
                high = max(s.high for s in (mine, peer) if s.high is not None)
                if max(mine.count, peer.count) <= LEAF or rng.width(low, high) <= 1:
                    leaves.append(rng)
                else:
                    children += digests.split(rng, mine, peer)
            pending = []
            for start in range(0, len(children), MAX_RANGES):
                chunk = children[start:start + MAX_RANGES]
                mine = self._local(name, lambda scanner, c=chunk: scanner.summaries(c))
                reply = self._ask({'name': name, 'op': 'digests',
                                   'ranges': [r.to_json() for r in chunk]})
                peer = _summaries(reply, len(chunk))
                report.ranges += len(chunk)
                pending += [(r, m, p) for r, m, p in zip(chunk, mine, peer, strict=True)
                            if not m.same(p)]
        differences: list[Difference] = []
        for start in range(0, len(leaves), LEAF_RANGES):
            chunk = leaves[start:start + LEAF_RANGES]
            differences += self._leaves(name, chunk, report)
        return differences

    def _leaves(self, name: str, ranges: list[Range], report: Report) -> list[Difference]:
        mine = {e.identity: e for e in self._local(name, lambda s: s.records(ranges))}
        reply = self._ask({'name': name, 'op': 'records',
                           'ranges': [r.to_json() for r in ranges],
                           'identities': [list(i) for i in sorted(mine)]})
        peer, peer_states = _records(reply, ranges, name)
        local_states = self._local(
            name, lambda s: s.states([i for i in peer if i not in mine]))
        report.records += len(set(mine) | set(peer))
        found = []
        for identity in sorted(set(mine) | set(peer)):
            ours, theirs = mine.get(identity), peer.get(identity)
            if ours is not None and theirs is not None and ours.values == theirs.values:
                continue
            found.append(Difference(name, identity, ours, theirs,
                                    local_states.get(identity), peer_states.get(identity)))
        return found


# -- the peer's replies, checked -------------------------------------------------

class BadReply(WireError):
    """The peer's reply to a verify request is not one."""


def _summary(item: Any) -> Summary:
    if not (isinstance(item, list) and len(item) == 4 and _int(item[0]) and item[0] >= 0
            and isinstance(item[1], str) and len(item[1]) <= 64
            and all(bound is None or _int(bound) for bound in item[2:])):
        raise BadReply('a summary is [count, digest, low, high]')
    count, digest, low, high = item
    if count and (low is None or high is None or low > high):
        raise BadReply('a summary of records has their lowest and highest id')
    return Summary(count, digest, low, high)


def _origins(reply: dict[str, Any]) -> dict[str, Summary]:
    origins = reply.get('origins')
    if not isinstance(origins, dict) or len(origins) > digests.MAX_ORIGINS:
        raise BadReply('expected {"origins": {origin: summary}}')
    found = {}
    for origin, item in origins.items():
        if not is_valid_name(origin):
            raise BadReply('an origin is a name')
        found[origin] = _summary(item)
    return found


def _summaries(reply: dict[str, Any], count: int) -> list[Summary]:
    items = reply.get('digests')
    if not isinstance(items, list) or len(items) != count:
        raise BadReply(f'expected {{"digests": [{count} summaries]}}')
    return [_summary(item) for item in items]


def _records(reply: dict[str, Any], ranges: list[Range], name: str,
             ) -> tuple[dict[Identity, Entry], dict[Identity, str]]:
    items, states = reply.get('records'), reply.get('states')
    limit = len(ranges) * digests.MAX_LEAF_RECORDS
    if not (isinstance(items, list) and len(items) <= limit and isinstance(states, list)
            and len(states) <= MAX_IDENTITIES):
        raise BadReply('expected {"records": [...], "states": [...]}')
    found: dict[Identity, Entry] = {}
    for item in items:
        if not (isinstance(item, list) and len(item) in (3, 4) and isinstance(item[1], dict)
                and (item[2] is None or isinstance(item[2], dict))):
            raise BadReply('a record is [identity, values, version, stamps of its links]')
        identity = _identity(item[0])
        kept = {}
        if len(item) == 4:
            try:
                kept = link_verify.check_stamps(item[3], name)
            except ValueError as exc:
                raise BadReply(str(exc)) from None
        if not any(r.origin == identity[0] and (r.lo is None or r.lo <= identity[1])
                   and (r.hi is None or identity[1] < r.hi) for r in ranges):
            raise BadReply('a record outside the ranges asked for')
        found[identity] = Entry(identity, item[1], item[2], kept)
    peer_states: dict[Identity, str] = {}
    for item in states:
        if not (isinstance(item, list) and len(item) == 2
                and item[1] in ('deleted', 'stale')):
            raise BadReply('a state is [identity, "deleted" or "stale"]')
        peer_states[_identity(item[0])] = item[1]
    return found, peer_states


def format_report(report: Report) -> str:
    """The differences for a terminal: one line each, values as ASCII JSON
    (whatever the peer put in them), then the summary."""
    from .printable import printable
    lines = []
    for difference in report.differences:
        data = difference.as_json(report.local_name, report.peer_name)
        ours = json.dumps(data[report.local_name], ensure_ascii=True, sort_keys=True)
        theirs = json.dumps(data[report.peer_name], ensure_ascii=True, sort_keys=True)
        origin, original_id = difference.identity
        deleted = (f" (deleted on {', '.join(data['deleted_on'])})"
                   if 'deleted_on' in data else '')
        if 'links' in data:
            deleted += f" (links differ: {', '.join(sorted(data['links']))})"
        lines.append(printable(f'{difference.name} [{origin}, {original_id}]{deleted}: '
                               f'{report.local_name} {ours} | {report.peer_name} {theirs}',
                               2000))
    lines.append(f'verify: {report.summary()}')
    return '\n'.join(lines)
