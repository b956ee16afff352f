"""Forgetting deletes: tombstones purged once both sides are done with them.

A tombstone (a row of ``communicator_mappings`` whose ``local_id`` is
NULL, see :mod:`.tracking`) keeps a deleted record deleted when a late
or concurrent update of it arrives; a natural-key tombstone
(``communicator_natural_tombstones``) does the same for a record of a
``match_on`` model created elsewhere under the deleted key.  Both are
needed only while such a message can still come, so they are deleted
(:func:`purge_page`) once

- the delete is older than the retention cut-off: its stamp's hlc
  (microseconds since the epoch, :mod:`.versions`) is compared, the
  tables keep no other time;
- the peer has the delete: every outbound message queued before it was
  delivered (a delete of ours), or it came from the peer and was applied
  (the tombstone exists only then).  Outbound messages go out in id
  order, so "the oldest message still waiting was queued after the
  delete" says it for every tombstone at once;
- no inbound message still to be applied addresses the identity (it
  would otherwise meet no tombstone when it is, at last).

Kept whatever their age: tombstones without a dated delete, and those of
our own identities in a later life (the id was handed out again; a new
record under it must keep counting lives where the peer does).

What keeps a purged delete from being undone: a message the peer sent
before is at or below the purge watermark of inbound messages
(:func:`.queues.store_inbound`) and is not stored again; and a message
that would create a record of an identity unknown here from a version
older than the deletes forgotten (:func:`purged_before`) is refused by
:mod:`.applying`, since it can only be a late update of a record whose
tombstone is gone.  docs/operations.rst states what this guarantees and
where it stops.
"""
from __future__ import annotations

import dataclasses
import datetime

from sqlalchemy import bindparam, delete, func, select
from sqlalchemy.orm import Session
from zope.sqlalchemy import mark_changed

from . import queues
from .models import (
    communicator_mappings,
    communicator_natural_tombstones,
    communicator_state,
    inbound_messages,
    outbound_messages,
)
from .predicates import one_of
from .versions import HERE, Version

M = communicator_mappings.c
T = communicator_natural_tombstones.c
IN = inbound_messages.c
OUT = outbound_messages.c

#: State row: the latest delete (hlc) whose tombstone was purged.
PURGED_KEY = 'tombstones_purged_hlc'
#: Between a delete's stamp and its message's ``created_at`` lie a few
#: statements (and, with clocks apart, the hlc may run ahead): a minute's
#: margin before "queued after the delete" is believed.
SLACK = datetime.timedelta(minutes=1)
_EPOCH = datetime.datetime(1970, 1, 1)
_MICROSECOND = datetime.timedelta(microseconds=1)


def to_hlc(when: datetime.datetime) -> int:
    """A naive UTC time as an hlc (microseconds since the epoch)."""
    return (when - _EPOCH) // _MICROSECOND


def horizon(session: Session, cutoff: datetime.datetime) -> int:
    """The hlc before which a delete may be forgotten: the retention
    cut-off, and before every outbound message still waiting for the peer
    (less :data:`SLACK`), so that a delete of ours was delivered."""
    limit = cutoff
    oldest = session.execute(select(OUT.created_at).where(OUT.delivered_at.is_(None))
                             .order_by(OUT.id).limit(1)).scalar()
    if oldest is not None:
        limit = min(limit, oldest - SLACK)
    return to_hlc(limit)


def purged_before(session: Session) -> int:
    """The latest delete forgotten here (0: none): a version older than
    this cannot show that a record it would create was not deleted."""
    value = session.execute(select(communicator_state.c.value)
                            .where(communicator_state.c.key == PURGED_KEY)).scalar()
    return int(value) if value else 0


def _remember_purged(session: Session, hlc: int) -> None:
    if hlc > purged_before(session):
        queues.set_state(session, PURGED_KEY, str(hlc))


@dataclasses.dataclass
class Page:
    deleted: int
    #: Where the next page starts; None when the table is done.
    position: str | None


#: Deleted only as read: a row an apply changed meanwhile (a record
#: created again, a later delete merged in) is no longer the one judged.
_DELETE_MAPPING = delete(communicator_mappings).where(
    M.id == bindparam('_id'), M.local_id.is_(None), M.version == bindparam('_version'))
_DELETE_NATURAL = delete(communicator_natural_tombstones).where(
    T.id == bindparam('_id'), T.version == bindparam('_version'))


def _deleted_hlc(version: Version) -> int | None:
    """When the delete (the latest, for a natural key) was stamped."""
    hlcs = list(version.deletes.values())
    if version.deleted is not None:
        hlcs.append(version.deleted[0])
    return max(hlcs, default=None)


def purge_page(session: Session, cutoff: datetime.datetime, position: str | None,
               page: int) -> Page:
    """Purge one page of mapping tombstones, starting at ``position``
    (``name<TAB>id``; None: the start), in the caller's transaction.

    Read per record name, by the index on ``(name, local_id)``: tombstones
    are the ``local_id IS NULL`` range of each name, apart from the live
    mappings.  The names are found one at a time, each by an index seek."""
    dialect = session.get_bind().dialect.name
    if position is None:
        name, after = session.execute(select(func.min(M.name))).scalar(), 0
        if name is None:
            return Page(0, None)
    else:
        name, _, after_text = position.partition('\t')
        after = int(after_text)
    rows = session.execute(select(M.id, M.origin, M.original_id, M.version, M.life)
                           .where(M.name == name, M.local_id.is_(None), M.id > after)
                           .order_by(M.id).limit(page)).all()
    limit = horizon(session, cutoff)
    candidates = []
    for row in rows:
        when = _deleted_hlc(Version.loads(row.version)) if row.version else None
        if when is None or when >= limit:
            continue
        if row.origin == HERE and (row.life or 0) > 0:
            continue  # a later life of our id: lives count on from it
        candidates.append((row, when))
    if candidates:
        awaited = set(session.execute(
            select(IN.original_id).where(IN.processed_at.is_(None), IN.given_up_at.is_(None),
                                         IN.refused_at.is_(None),
                                         one_of(IN.original_id,
                                                {row.original_id for row, _ in candidates},
                                                dialect))).scalars())
        candidates = [(row, when) for row, when in candidates
                      if row.original_id not in awaited]
    if candidates:
        session.execute(_DELETE_MAPPING, [{'_id': row.id, '_version': row.version}
                                          for row, _ in candidates])
        _remember_purged(session, max(when for _, when in candidates))
        mark_changed(session)
    if len(rows) == page:
        return Page(len(candidates), f'{name}\t{rows[-1].id}')
    following = session.execute(select(func.min(M.name)).where(M.name > name)).scalar()
    return Page(len(candidates), None if following is None else f'{following}\t0')


def purge_natural_page(session: Session, cutoff: datetime.datetime, position: str | None,
                       page: int) -> Page:
    """Purge one page of natural-key tombstones whose latest delete is
    older than the horizon, in the caller's transaction."""
    after = int(position) if position else 0
    rows = session.execute(select(T.id, T.version).where(T.id > after)
                           .order_by(T.id).limit(page)).all()
    limit = horizon(session, cutoff)
    purged = [(row.id, when) for row in rows
              if (when := _deleted_hlc(Version.loads(row.version))) is not None
              and when < limit]
    if purged:
        versions = {row.id: row.version for row in rows}
        session.execute(_DELETE_NATURAL, [{'_id': row_id, '_version': versions[row_id]}
                                          for row_id, _ in purged])
        _remember_purged(session, max(when for _, when in purged))
        mark_changed(session)
    return Page(len(purged), str(rows[-1].id) if len(rows) == page else None)
