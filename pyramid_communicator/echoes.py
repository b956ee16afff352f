"""Echoes: a side restored from a backup gets back the records it made
itself, and lost, from its peer.

Records a side created (or edited, or deleted) between its backup and the
restore live on only at the peer, as ``(origin=restored side, id)``.
Healing (:mod:`.restores`) re-sends what each side delivered, but the
peer cannot give those back by the usual way: the trust rule
(:mod:`.trust`) forbids a peer to create records of another origin, or
a hostile facade could inject "central's own" records into central.

The same holds of a side's edits and deletes of the *peer's* records
made in that time: the peer holds them stamped by the restored side,
past the restored side's clock of the record, and the trust rule
(:func:`.trust.check_version`) refuses every claim of such an edit, the
peer's later edits of the record and ``--repair`` included: the sides
could never converge.

So every record message an app authors (of any origin) is signed with a
secret only that app holds (:mod:`.signatures`; the key is 32 random
bytes made on first use and kept in ``communicator_state``, in the same
backup as the data: no setting to lose or leak).  The receiver keeps the
signature with the inbound message.  When a checkpoint differs, the peer
looks at what the other side says it still holds of its own messages
(``X-Communicator-Acknowledged``) and *echoes* back, in its outbound
queue, the signed messages that side sent with ids above it (of any
origin), with
their signatures, before anything else it has to send (the messages
waiting behind them get new ids past the echoes: a peer's later edit of
an echoed record must come after the record).  A side that was not
restored holds all of them, so nothing is echoed to it.

The restored side verifies each echo with its own key and applies it as
its own lost history, never as the peer's claim: what its key signed is
an echo, whatever the origin (a peer signs what it authors with its own
key, which does not verify here: that is the peer's plain message, under
the trust rule).  Its own record comes back under its own identity and
id (the own-origin mapping row is written again, version and life kept);
its edit of a peer's record it still holds merges by stamps as below,
and one of a peer's record it lost altogether (the peer made it after
the backup) brings the record back as it sent it, under the peer's
identity (the peer's own create, sent again behind the echoes, is
older); an echoed edit wins an attribute only
with a newer stamp than the one held here, an echoed delete deletes
only a record not edited since.  Later edits from the peer then apply as
usual.  A message of our origin that carries a signature that does not
verify (forged, tampered, another key) and names no edit of the sender is
refused (:class:`.trust.Refused`: logged, counted in ``--status``, never
applied); one without any is not an echo and meets the trust rule as
before.

A simpler design was weighed: accept a peer's state of its own record
whenever the edit of ours it claims is backed by our signature.  That is
what this does, message by message: the signature covers exactly one
message's body and version, so it backs exactly the edit that message
made, and nothing the peer wrote after it (which then comes in its own,
later message, once our clock knows the edit again).  A peer replaying genuine
old echoes changes nothing: they are older than what we hold.

An echoed record gets its old id back by an explicit primary key; the
model's id sequence is moved past it (PostgreSQL ``setval``; MariaDB and
SQLite follow explicit ids by themselves), so that no record made later
reuses it.  A record made here *after the restore and before the healing
run* may already have taken such an id: the echo then finds the id taken
and is refused with that reason (the old record stays on the peer only,
or, if the new one was pushed first, as on central's runs, is gone on
both sides); the same when the id's local record has a mapping but all of
its values are newer own edits than the echo (:func:`_made_since`).
``--status`` counts them.  Run ``pcommunicate`` right after a restore,
before the app takes writes.
"""
from __future__ import annotations

import dataclasses
import logging
import secrets
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from . import queues
from .applying import Message, Refused, _Application
from .models import communicator_state, inbound_messages, utcnow
from .records import fingerprint, natural_key, receiver_for
from .signatures import verify
from .versions import HERE, Version, covered, latest_hlc, merge_clocks, named
from .working_set import WorkingSet

log = logging.getLogger(__name__)
IN = inbound_messages.c

#: ``communicator_state`` key of this app's signing key (hex).
KEY_STATE = 'signing_key'
#: ``communicator_state`` key: how many echoes this app took back.
TAKEN_BACK_KEY = 'echoes_taken_back'
#: At most this many messages are echoed back per healing: the other
#: side's claim of what it holds is hostile input.
ECHO_LIMIT = 10_000
_INFO = 'communicator_signing_key'
#: In the reasons of refused echoes (``--status`` counts them by these).
NOT_VERIFIED = 'whose signature does not verify'
ID_TAKEN = 'an id a record made here since took'


def signing_key(session: Session) -> bytes:
    """This app's secret signing key, made on first use.  A restore brings
    back the key of the backup, which signed what the peer holds (if the
    backup predates the key, echoes of messages signed before the restore
    fail to verify and are refused: nothing is lost that the restore did
    not lose already)."""
    cached = session.info.get(_INFO)
    if cached is not None:
        return cached
    value = session.execute(select(communicator_state.c.value)
                            .where(communicator_state.c.key == KEY_STATE)).scalar()
    try:
        key = bytes.fromhex(value or '')
    except ValueError:
        key = b''
    if len(key) != 32:
        key = secrets.token_bytes(32)
        queues.set_state(session, KEY_STATE, key.hex())
        return key  # not cached: the transaction may still roll back
    session.info[_INFO] = key
    return key


# -- the peer: echoing back -----------------------------------------------------

@dataclasses.dataclass
class Echo:
    """The messages of the other side's origin to send back to it."""
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    #: Their ids at the other side, first and last.
    ids: tuple[int, int] | None = None
    #: Messages after ``holds`` that retention purged here: gone.
    purged_after: int | None = None
    #: More than :data:`ECHO_LIMIT` were due; these many were left out.
    left_out: int = 0

    def __str__(self) -> str:
        text = f'echoed back {len(self.rows)} of its own messages'
        if self.ids:
            text += f' (its ids {self.ids[0]}-{self.ids[1]})'
        if self.left_out:
            text += f', {self.left_out} more left out (over {ECHO_LIMIT})'
        if self.purged_after is not None:
            text += f', its messages after id {self.purged_after} were purged here'
        return text


def to_echo(session: Session, peer: str, holds: int) -> Echo:
    """The signed messages of ``peer``'s origin it sent us with ids above
    ``holds`` (what it says it still holds of its own), as outbound rows
    without ids, in their order."""
    echo = Echo()
    # Any origin: what the peer authored of our records is signed by it too.
    where = (IN.sender == peer, IN.remote_id > holds, IN.signature.is_not(None))
    count = session.execute(select(func.count()).where(*where)).scalar_one()
    if queues.purged_watermark(session, peer) > holds:
        echo.purged_after = holds
    if not count:
        return echo
    echo.left_out = max(0, count - ECHO_LIMIT)
    rows = session.execute(
        select(IN.remote_id, IN.body, IN.origin, IN.original_id, IN.refs, IN.version,
               IN.format, IN.signature)
        .where(*where).order_by(IN.remote_id).limit(ECHO_LIMIT)).all()
    now = utcnow()
    echo.rows = [{'body': row.body, 'origin': row.origin, 'original_id': row.original_id,
                  'refs': row.refs, 'version': row.version, 'format': row.format,
                  'signature': row.signature, 'created_at': now, 'delivered_at': None}
                 for row in rows]
    echo.ids = (rows[0].remote_id, rows[-1].remote_id)
    return echo


# -- the restored side: taking back -------------------------------------------

def is_echo(work: WorkingSet, message: Message) -> bool:
    """Any message our own key signed (our record, or our edit or delete
    of a peer's record, echoed back); or one of our origin that carries a
    signature and names an identity of ours we do not hold: only an echo
    could bring that, and it is refused if it does not verify.

    The peer signs with its own key what it authors, its edits of our
    records included (and it may send one that names no edit of its own,
    a re-publish): a signature that does not verify here, on a record of
    ours we hold, is the peer's plain claim and meets the trust rule like
    any other.  Which way a message goes only picks the reason of a
    refusal: a forged echo of a record we hold claims our edits past what
    we hold, which :func:`.trust.check_version` refuses, or changes
    nothing."""
    if message.signature is None:
        return False
    if _verifies(work, message):
        return True
    if message.origin != work.local_name or message.original_id is None:
        return False
    try:
        name = message.decode()[0]
    except Exception:
        return False  # malformed: the usual path says why
    return work.find(name, HERE, message.original_id) is None


def _verifies(work: WorkingSet, message: Message) -> bool:
    return verify(signing_key(work.session), message.signature, message.origin,
                  message.original_id, message.body, message.version, message.refs)


def apply_echo(work: WorkingSet, message: Message) -> object | None:
    """Take back a message of our own that the peer echoed; refused unless
    our key signed exactly it."""
    local_name = work.local_name
    if not _verifies(work, message):
        raise Refused(f'{message.sender} sent {message.original_id} of {local_name}, which '
                      f'{local_name} does not hold, signed but not by {local_name}: an echo '
                      f'{NOT_VERIFIED} (forged or changed), or a record never sent to it: '
                      'not applied')
    name, attributes = message.decode()
    receiver = receiver_for(name)
    application = _Application(work, receiver, message)
    incoming = application.incoming
    if len(receiver.primary_key) != 1:
        raise Refused(f'{name} has no single-column primary key: an echo cannot give its '
                      'id back')
    _taken_back(work.session)
    own = message.origin == local_name
    log.info('%s echoed %s %s of %s back: taken back as our own', message.sender, name,
             message.original_id, message.origin)
    identity = work.find(name, application.key[0], message.original_id)
    if identity is not None and application.life != identity.life:
        return None  # another record that had this id: not ours to bring back now
    if incoming.deleted is not None:
        return _delete(work, application, identity)
    if identity is None:
        if not own:  # our edit of a record of the peer's we lost too
            return _adopt(work, application, attributes)
        return _create(work, application, attributes)
    if identity.record is None:
        return None  # deleted here since (a delete we still hold is newer)
    if own and _made_since(work, application, identity.record):
        raise Refused(f'{name} {message.original_id} of {local_name}, echoed by '
                      f'{message.sender}, has {ID_TAKEN} (after the restore, before this '
                      'run: all of its values are newer than the echo): not applied, the '
                      'record made here keeps the id')
    return _update(work, application, identity.record, attributes)


def _made_since(work: WorkingSet, application: _Application, record: object) -> bool:
    """Is ``record`` another record than the echoed one, made here after
    the restore with an id the lost one had?  Every value it holds is our
    own edit newer than anything the echo names, and it has a value for
    every attribute the echo carries: a record that existed at the backup
    keeps an older stamp of at least one attribute unless all of them were
    written since, and then the echo could change nothing anyway (refusing
    it loses nothing; only the reason says more than is certain)."""
    local = work.version_of(record)
    incoming = application.incoming
    if incoming is None or not local.stamps or not incoming.stamps:
        return False
    newest = latest_hlc(incoming)
    return (all(app == HERE and hlc > newest for hlc, app, *_ in local.stamps.values())
            and all(key in local.stamps for key in incoming.stamps))


def _taken_back(session: Session) -> None:
    """Count it for ``--status``, in the batch's transaction (rare: only
    after a restore)."""
    value = session.execute(select(communicator_state.c.value)
                            .where(communicator_state.c.key == TAKEN_BACK_KEY)).scalar()
    count = int(value) if value and value.isdigit() else 0
    queues.set_state(session, TAKEN_BACK_KEY, str(count + 1))


def _create(work: WorkingSet, application: _Application,
            attributes: dict[str, Any]) -> object:
    receiver, message = application.receiver, application.message
    pk = receiver.primary_key[0]
    if work.session.get(receiver.cls, message.original_id) is not None:
        raise Refused(f'{receiver.name} {message.original_id} of {work.local_name}, echoed '
                      f'by {message.sender}, has {ID_TAKEN} (after the restore, before this '
                      f'run): not applied, it stays on {message.sender} only')
    # A genuine echo replayed after our tombstone of the record was purged
    # would bring a deleted record back: refused as any late create is.
    application.not_forgotten()
    record = receiver.cls()
    setattr(record, pk, message.original_id)
    version = application.merge(record, Version(), attributes, created=True)
    work.created(receiver, record)
    work.map(receiver.name, HERE, message.original_id, record, version, application.life)
    _move_sequence(work.session, receiver.cls.__table__, pk, message.original_id)
    return record


def _adopt(work: WorkingSet, application: _Application,
           attributes: dict[str, Any]) -> object:
    """Our lost edit of a peer's record we no longer hold at all (the peer
    made it after our backup): the record as we sent it, under the peer's
    identity and a local id of ours.  The peer's own create, sent again
    behind the echoes, then finds it and is older."""
    receiver, message = application.receiver, application.message
    application.not_forgotten()
    record = receiver.cls()
    version = application.merge(record, Version(), attributes, created=True)
    work.created(receiver, record)
    work.map(receiver.name, message.origin, message.original_id, record, version,
             application.life)
    return record


def _update(work: WorkingSet, application: _Application, record: object,
            attributes: dict[str, Any]) -> object:
    """Our lost edits: an attribute whose echoed stamp is newer than ours."""
    incoming, message = application.incoming, application.message
    local = work.version_of(record)
    version = Version(clock=merge_clocks(local.clock, incoming.clock),
                      stamps=dict(local.stamps))
    values = dict(attributes)
    for key, (_, ref_id) in (message.refs or {}).items():
        values.setdefault(key, ref_id)
    columns = application.receiver.columns(type(record))
    for key, stamp in incoming.stamps.items():
        if key not in columns or key not in values:
            continue
        mine = local.stamp(key)
        if mine is not None and named(stamp, work.local_name) <= named(mine, work.local_name):
            continue
        value = application.value(record, key, values[key], False)
        setattr(record, key, value)
        version.stamps[key] = (*stamp, fingerprint(value))
    work.save(record, version)
    return record


def _delete(work: WorkingSet, application: _Application, identity: Any) -> None:
    """Our lost delete: of a record not edited since (here, after the
    restore), or kept as a tombstone if the record is not here."""
    incoming, receiver = application.incoming, application.receiver
    tomb = Version(clock=dict(incoming.clock), deleted=incoming.deleted)
    if identity is None:
        work.map(receiver.name, application.key[0], application.message.original_id, None,
                 tomb, application.life)
        return None
    record = identity.record
    if record is None:
        return None
    local = work.version_of(record)
    if any(not covered((s[0], s[1]), incoming.clock) for s in local.stamps.values()):
        return None  # edited since the delete: the record stays
    natural = natural_key(receiver, {key: getattr(record, key) for key in receiver.match_on})
    work.delete(receiver, record)
    work.bury(record, identity, Version(clock=merge_clocks(local.clock, incoming.clock),
                                        deleted=incoming.deleted), natural)
    return None


def _move_sequence(session: Session, table: Any, pk: str, past: int) -> None:
    """PostgreSQL's sequence does not follow an explicit id: move it, so
    that the next record does not take the echoed one's id.  MariaDB's
    counter and SQLite's rowid (or ``sqlite_sequence``) follow by themselves."""
    if session.get_bind().dialect.name != 'postgresql':
        return
    column = table.c[pk].name if pk in table.c else pk
    sequence = session.execute(text('SELECT pg_get_serial_sequence(:table, :column)'),
                               {'table': table.fullname, 'column': column}).scalar()
    if sequence:
        session.execute(text('SELECT setval(CAST(:sequence AS regclass), GREATEST(:past, '
                             f'(SELECT last_value FROM {sequence})))'),
                        {'sequence': sequence, 'past': past})

