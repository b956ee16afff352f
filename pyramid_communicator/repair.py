"""``pcommunicate --repair``: make the two sides equal again, after
:mod:`.verify` found where they differ.

Repairs travel as ordinary messages, under the trust rule
(:mod:`.trust`), never as writes into the peer's tables: the side whose
version must win *re-publishes* its record as a new local edit stamped
now (:func:`republish`), which the other side takes as newer, and a
normal sync carries it.  Central re-publishes its own winners; it asks
the peer (``POST /verify.json``, op ``republish``) to re-publish the
peer's.  So a repair can do nothing a peer's ordinary edit could not.

Who wins (:func:`plan`):

- both sides hold the record, their versions differ: the newer, as a sync
  would settle it (the one whose clock has seen the other's; concurrent:
  the later edit);
- versions equal but values differ (an edit outside the add-on): the app
  named by ``--prefer`` (default this app);
- one side lacks it and a tombstone there says it was deleted: that side
  sends its delete again (:func:`redelete`), a new delete stamped now,
  which the other side applies as any delete (a concurrent edit there may
  survive it by the model's policy, recorded as a conflict); for a model
  whose deletes do not travel (``deletes=False``) it is left, and reported;
- one side lacks it, no tombstone: the side that holds it re-creates it
  there, unless the record's identity belongs to the side that lacks it:
  no peer may create another app's own record
  (:func:`.trust.check_origin`), so that one is reported for an operator
  to restore.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session
from zope.sqlalchemy import mark_changed

from . import keys, link_verify, wire
from .digests import Identity, Scanner, stored_origin
from .links import NO_LINKS
from .models import communicator_mappings, outbound_messages, utcnow
from .publishing import publish_records
from .records import Receiver, encode_body, receiver_for
from .verify import Difference
from .versions import HERE, Version
from .versions import to_wire as version_to_wire

log = logging.getLogger(__name__)
_compact = json.JSONEncoder(separators=(',', ':'), ensure_ascii=False).encode
M = communicator_mappings.c

#: Identities per ``republish`` request (and per local transaction).
REPUBLISH_BATCH = 500


@dataclasses.dataclass(frozen=True)
class LinkFix:
    """One link present on one side only, and the side (``'local'`` or
    ``'peer'``) whose state of it wins and is sent."""
    name: str
    key: str
    owner: Identity
    target: Identity
    side: str


@dataclasses.dataclass
class Plan:
    local: list[Difference] = dataclasses.field(default_factory=list)
    peer: list[Difference] = dataclasses.field(default_factory=list)
    #: (difference, why it is left as it is)
    left: list[tuple[Difference, str]] = dataclasses.field(default_factory=list)
    #: Links whose states are sent again (:mod:`.link_verify`).
    links: list[LinkFix] = dataclasses.field(default_factory=list)


def _clock(version: dict[str, Any] | None) -> dict[str, int]:
    clock = (version or {}).get('clock')
    return clock if isinstance(clock, dict) else {}


def _latest(version: dict[str, Any] | None) -> int:
    values = [v for v in _clock(version).values() if isinstance(v, int)]
    return max(values, default=0)


def newer(local: dict[str, Any] | None, peer: dict[str, Any] | None) -> str | None:
    """'local' or 'peer' for the version a sync would take as newer; None
    for equal versions."""
    ours, theirs = _clock(local), _clock(peer)
    if ours == theirs:
        return None
    apps = set(ours) | set(theirs)
    if all(ours.get(app, 0) >= theirs.get(app, 0) for app in apps):
        return 'local'
    if all(theirs.get(app, 0) >= ours.get(app, 0) for app in apps):
        return 'peer'
    return 'local' if _latest(local) >= _latest(peer) else 'peer'


def plan(differences: Iterable[Difference], local_name: str, peer_name: str,
         prefer: str) -> Plan:
    """Which side re-publishes each differing record, and what is left."""
    result = Plan()
    for d in differences:
        origin = d.identity[0]
        if d.local is not None and d.peer is not None:
            collections = _collections(d.name)
            for key in d.links():
                _settle_links(result, d, key, local_name, peer_name, prefer)
            if all(d.local.values.get(key) == d.peer.values.get(key)
                   for key in set(d.local.values) | set(d.peer.values)
                   if key not in collections):
                continue  # only its links differ
            winner = newer(d.local.version, d.peer.version)
            if winner is None:
                winner = 'local' if prefer == local_name else 'peer'
        else:
            holder, lacking, state = ((local_name, peer_name, d.peer_state)
                                      if d.local is not None else
                                      (peer_name, local_name, d.local_state))
            if state == 'deleted' and _deletes_travel(d.name):
                # The side that deleted sends its delete again.
                (result.local if lacking == local_name else result.peer).append(d)
                continue
            why = _not_recreated(origin, holder, lacking, state)
            if why is not None:
                result.left.append((d, why))
                continue
            winner = 'local' if holder == local_name else 'peer'
            # Re-created with its links: they follow it, sent by its holder.
            entry = d.local if winner == 'local' else d.peer
            for key in _collections(d.name):
                for target in link_verify.identities(entry.values.get(key)):
                    result.links.append(LinkFix(d.name, key, d.identity, target, winner))
        (result.local if winner == 'local' else result.peer).append(d)
    return result


def _collections(name: str) -> set[str]:
    try:
        return {link.key for link in link_verify.owned(receiver_for(name))}
    except LookupError:
        return set()


def _settle_links(result: Plan, d: Difference, key: str, local_name: str,
                  peer_name: str, prefer: str) -> None:
    """A :class:`LinkFix` per link of ``key`` present on one side only,
    the winner by :func:`.link_verify.decide`; a link to a record never
    shared is left (no identity names it, so no message can)."""
    ours, theirs = d.local.values.get(key), d.peer.values.get(key)
    unshared = [link_verify.unshared(ours), link_verify.unshared(theirs)]
    if unshared[0] != unshared[1]:
        holder = local_name if unshared[0] > unshared[1] else peer_name
        result.left.append((d, f'{key}: {holder} links a record it never shared; '
                               'no link to it is sent'))
    mine, peer = link_verify.identities(ours), link_verify.identities(theirs)
    for target in sorted(mine ^ peer):
        side = link_verify.decide(list(target), d.local.stamps.get(key, []),
                                  d.peer.stamps.get(key, []), local_name, peer_name, prefer)
        result.links.append(LinkFix(d.name, key, d.identity, target, side))


def _deletes_travel(name: str) -> bool:
    try:
        return receiver_for(name).deletes
    except LookupError:
        return False


def _not_recreated(origin: str, holder: str, lacking: str, state: str | None) -> str | None:
    """Why ``holder`` may not re-create a record on ``lacking`` (None: it may)."""
    if state == 'deleted':
        return (f'deleted on {lacking} (a tombstone), and deletes of this model do not '
                'travel: not created again')
    if origin == lacking:
        return (f"{lacking}'s own record is gone there and only {lacking} may create it: "
                'restore it from a backup')
    if origin != holder and state != 'stale':
        return f'a record of {origin}: only {origin} may create it on {lacking}'
    return None


def republish(session: Session, receiver: Receiver, identities: Sequence[Identity],
              local_name: str) -> tuple[int, list[Identity]]:
    """Publish these records again as a new local edit of every crossing
    attribute, in ``session``'s transaction: the peer takes them as newer
    than what it holds, whatever was edited outside the add-on.  Returns
    how many were published and the identities without a live record here.

    Publishing stamps only attributes whose value differs from the one last
    stamped; the stamped fingerprints are forgotten first, so that every
    attribute counts as edited now."""
    connection = session.connection()
    scanner = Scanner(connection, receiver, local_name)
    local_ids = scanner.local_ids(identities)
    skipped = [identity for identity in identities if identity not in local_ids]
    records = []
    for local_id, local_key in sorted(set(local_ids.values())):
        record = keys.get(session, receiver, local_id, local_key)
        if record is None:
            continue
        for row in connection.execute(select(M.id, M.version).where(
                M.name == receiver.name, M.local_id == local_id)).all():
            if row.version:
                version = json.loads(row.version)
                version['stamps'] = {key: [stamp[0], stamp[1], '']
                                     for key, stamp in (version.get('stamps') or {}).items()}
                connection.execute(update(communicator_mappings).where(M.id == row.id)
                                   .values(version=json.dumps(version, sort_keys=True,
                                                              separators=(',', ':'))))
        records.append(record)
    skipped += [identity for identity, (local_id, local_key) in local_ids.items()
                if keys.get(session, receiver, local_id, local_key) is None]
    # Its links are settled one by one (:mod:`.link_verify`), not sent
    # whole with it.
    session.info[NO_LINKS] = True
    try:
        done = publish_records(session, records)
    finally:
        session.info.pop(NO_LINKS, None)
    if done:
        log.info('republished %d %s record(s) to repair drift', done, receiver.name)
    deleted = redelete(session, receiver, skipped, local_name)
    return done + len(deleted), [identity for identity in skipped if identity not in deleted]


def redelete(session: Session, receiver: Receiver, identities: Sequence[Identity],
             local_name: str) -> set[Identity]:
    """Send again the delete of records this side deleted (their tombstones
    among ``identities``), as a new delete stamped now: the delete of old
    may name the peer itself (the peer deleted, then lost it in a restore),
    which the peer would rightly refuse (:mod:`.trust`).  The tombstone
    keeps the new version.  Returns the identities sent."""
    if not receiver.deletes or not identities:
        return set()
    connection = session.connection()
    states = Scanner(connection, receiver, local_name).states(identities)
    sent: set[Identity] = set()
    for identity, state in states.items():
        if state != 'deleted':
            continue
        origin = stored_origin(identity[0], local_name)
        row = connection.execute(select(M.id, M.version, M.life).where(
            M.name == receiver.name, M.origin == origin, M.original_id == identity[1],
            M.local_id.is_(None))).first()
        if row is None:
            continue
        version = Version.loads(row.version)
        version.delete()
        connection.execute(update(communicator_mappings).where(M.id == row.id)
                           .values(version=version.dumps()))
        connection.execute(outbound_messages.insert().values(
            body=encode_body(receiver.name, {}), origin=None if origin == HERE else origin,
            original_id=identity[1], refs=None,
            version=_compact(version_to_wire(version, HERE, row.life or 0)),
            format=wire.KEYED_FORMAT if receiver.keyed else wire.RECORD_FORMAT,
            created_at=utcnow()))
        sent.add(identity)
    if sent:
        mark_changed(session)
        log.info('sent the delete of %d %s record(s) again to repair drift', len(sent),
                 receiver.name)
    return sent


def _relink(bind: Any, settings: Any, client: Any, receiver: Receiver,
            result: RepairResult) -> None:
    """Send each winning side's state of the links of ``receiver`` that
    differ: ours in a host transaction per batch, the peer's on request;
    after the records' own re-publishing, so that a re-created record
    arrives before its links."""
    import transaction
    from zope.sqlalchemy import register
    fixes = [fix for fix in result.plan.links if fix.name == receiver.name]
    for side in ('local', 'peer'):
        items = [(fix.key, fix.owner, fix.target) for fix in fixes if fix.side == side]
        for start in range(0, len(items), REPUBLISH_BATCH):
            chunk = items[start:start + REPUBLISH_BATCH]
            if side == 'local':
                tm = transaction.TransactionManager(explicit=True)
                session = Session(bind=bind)
                register(session, transaction_manager=tm)
                try:
                    with tm:
                        done, skipped = link_verify.relink(session, receiver, chunk,
                                                           settings.name)
                finally:
                    session.close()
                result.links_local += done
            else:
                reply, _ = client.verify_request({
                    'name': receiver.name, 'op': 'relink',
                    'links': [[key, list(owner), list(target)] for key, owner, target in chunk]})
                done, skipped = reply.get('relinked'), reply.get('skipped')
                if isinstance(done, int) and not isinstance(done, bool) and done >= 0:
                    result.links_peer += done
            if skipped:
                log.warning('repair could not send %d link(s) of %s from %s: a record of '
                            'theirs is not there', len(skipped) if isinstance(skipped, list)
                            else 0, receiver.name, 'here' if side == 'local' else 'the peer')


@dataclasses.dataclass
class RepairResult:
    before: Any
    plan: Plan
    #: Records re-published here, and by the peer on our request.
    local: int = 0
    peer: int = 0
    #: Link states sent here, and by the peer on our request.
    links_local: int = 0
    links_peer: int = 0
    #: The sync that carried the repairs (a :class:`.sync.Summary`).
    sync: Any = None
    after: Any = None

    def summary(self) -> str:
        left = len(self.after.differences) if self.after is not None else '?'
        return (f'found={len(self.before.differences)} republished_here={self.local} '
                f'republished_by_peer={self.peer} relinked_here={self.links_local} '
                f'relinked_by_peer={self.links_peer} left={left}')


def repair(bind: Any, settings: Any, client: Any, names: Sequence[str], prefer: str,
           progress: Any = None, registry: Any = None) -> RepairResult:
    """Verify, re-publish each winner on its side, sync, and verify again.

    Each side's re-publishing commits before the sync carries it: our own
    in a host session and transaction of its own, the peer's in its
    request's.  The caller holds the run lock."""
    import transaction
    from zope.sqlalchemy import register

    from .sync import Communicator
    from .verify import Verifier

    verifier = Verifier(bind, settings.name, client)
    before = verifier.run(names)
    if prefer not in (settings.name, verifier.peer_name):
        raise ValueError(f'--prefer {prefer}: neither this app ({settings.name}) nor its '
                         f'peer ({verifier.peer_name})')
    result = RepairResult(before, plan(before.differences, settings.name,
                                       verifier.peer_name, prefer))
    for difference, why in result.plan.left:
        log.warning('repair leaves %s %s as it is: %s', difference.name,
                    list(difference.identity), why)
    for name in names:
        receiver = receiver_for(name)
        ours = [d.identity for d in result.plan.local if d.name == name]
        theirs = [d.identity for d in result.plan.peer if d.name == name]
        for start in range(0, len(ours), REPUBLISH_BATCH):
            tm = transaction.TransactionManager(explicit=True)
            session = Session(bind=bind)  # a host session: what it publishes is sent
            register(session, transaction_manager=tm)
            try:
                with tm:
                    done, _ = republish(session, receiver, ours[start:start + REPUBLISH_BATCH],
                                        settings.name)
            finally:
                session.close()
            result.local += done
        for start in range(0, len(theirs), REPUBLISH_BATCH):
            reply, _ = client.verify_request({'name': name, 'op': 'republish', 'identities': [
                list(identity) for identity in theirs[start:start + REPUBLISH_BATCH]]})
            done = reply.get('republished')
            if isinstance(done, int) and not isinstance(done, bool) and done >= 0:
                result.peer += done
        _relink(bind, settings, client, receiver, result)
    if result.local or result.peer or result.links_local or result.links_peer:
        communicator = Communicator(settings, bind, client=client, registry=registry,
                                    **({'progress': progress} if progress else {}))
        try:
            result.sync = communicator.communicate()
        finally:
            communicator.session.close()
    result.after = verifier.run(names)
    log.info('repair: %s', result.summary())
    return result
