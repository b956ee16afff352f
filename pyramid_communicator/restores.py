"""Restores: a database put back from a backup is told apart, and healed.

Modelled on CouchDB's replication checkpoints.  At the start of every run
central sends an empty push whose headers carry a *checkpoint*: the token
both sides recorded at the end of the last exchange, and a new one to
record now.  A database restored from a backup holds an older token than
its peer (or none): the tokens differ.  Then both sides "start over",
each from what the other says it has stored of it (the highest id it
received, which inbound already knows, purge watermark included):

- a side re-sends what it delivered after that id (delivered messages
  marked undelivered again, while retention still keeps them; the
  receiver's idempotent store skips what it already has);
- a side whose undelivered messages have ids the peer already holds
  (messages made after a restore of this side reuse ids handed out
  before it) gives them new ids above the peer's, and moves its id
  sequence past them, so they are never taken for duplicates.

Tokens are ``<n>.<random>``: the side whose ``n`` is behind is the one
restored (said in the log and in ``--status``; that side also takes a new
*epoch*, the random identity of its database).  The facade keeps the
token before its last one too: central holding that one means the last
checkpoint's reply was lost (or central stopped before recording it), not
a restore, and nothing is healed, unless one side no longer holds what
it acknowledged to the other (it received, or was acknowledged, more than
it now has): that is a restore whatever the tokens say.

Everything the peer reports is hostile input.  It can only make this side
send again what it already sent (``delivered_at`` set: never a record it
did not send) and renumber messages it sends anyway; it cannot make
anything be dropped, and ids it reports past :data:`MAX_ID` are refused.
Nothing here does network I/O: callers run it inside a transaction.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import secrets
from collections.abc import Mapping

from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.orm import Session

from . import echoes, queues
from .models import communicator_state, outbound_messages, utcnow
from .predicates import one_of
from .wire import WireError

log = logging.getLogger(__name__)
OUT = outbound_messages.c

#: Request and reply: the sender's database identity.
EPOCH_HEADER = 'X-Communicator-Epoch'
#: Request: ``<recorded token or -> <new token>``; reply: ``<the server's
#: recorded token or -> <verdict>`` (:data:`VERDICTS`).
CHECKPOINT_HEADER = 'X-Communicator-Checkpoint'
#: The highest message id the sender has stored from the other side.
RECEIVED_HEADER = 'X-Communicator-Received'
#: The highest of its own message ids the sender believes the other side
#: acknowledged (shown in the log; healing goes by ``Received``).
ACKNOWLEDGED_HEADER = 'X-Communicator-Acknowledged'
VERDICTS = ('same', 'first', 'differs')

EPOCH_KEY = 'epoch'
#: The client's (central's) one checkpoint: ``<token> <peer name>``.
CLIENT_KEY = 'checkpoint'
#: The last restore detected and what was done about it, one line.
RESTORE_KEY = 'restore'
#: Ids a peer may report; more is a lie or a bug, and never acted on.
MAX_ID = 2 ** 53

_TOKEN = re.compile(r'(\d{1,15})\.([0-9a-f]{16})')
_EPOCH = re.compile(r'[0-9a-f]{16,32}')


def _server_key(peer: str) -> str:
    return f'checkpoint:{peer}'


def _acknowledged_key(peer: str) -> str:
    return f'acknowledged:{peer}'


def _peer_epoch_key(peer: str) -> str:
    return f'epoch:{peer}'


def _state(session: Session, key: str) -> str | None:
    return session.execute(select(communicator_state.c.value)
                           .where(communicator_state.c.key == key)).scalar()


def own_epoch(session: Session) -> str:
    """This database's identity, made on first use.  A restore brings an
    old one back; the side that finds itself restored takes a new one."""
    epoch = _state(session, EPOCH_KEY)
    if epoch is None or not _EPOCH.fullmatch(epoch):
        epoch = secrets.token_hex(8)
        queues.set_state(session, EPOCH_KEY, epoch)
    return epoch


def _number(token: str | None) -> int:
    return int(token.split('.')[0]) if token else 0


def new_token(previous: str | None) -> str:
    return f'{_number(previous) + 1}.{secrets.token_hex(8)}'


def acknowledged(session: Session, peer: str) -> int:
    """The highest of our ids ``peer`` acknowledged: the highest delivered
    id, or what was recorded before retention purged it."""
    recorded = _state(session, _acknowledged_key(peer))
    delivered = session.execute(select(func.coalesce(func.max(OUT.id), 0))
                                .where(OUT.delivered_at.is_not(None))).scalar_one()
    return max(int(recorded) if recorded and recorded.isdigit() else 0, delivered)


@dataclasses.dataclass
class Healing:
    """What one side did after a checkpoint differed."""
    #: Delivered messages marked undelivered, to go again, and their ids.
    resent: int = 0
    resent_ids: tuple[int, int] | None = None
    #: Messages the peer acknowledged after ``from_id`` but retention
    #: deleted already: they cannot be sent again.
    purged_after: int | None = None
    #: Undelivered messages given new ids past the peer's.
    renumbered: int = 0
    #: The id sequence moved to at least this.
    sequence: int | None = None
    #: The peer's own messages sent back to it (:mod:`.echoes`).
    echo: echoes.Echo | None = None

    def __str__(self) -> str:
        parts = [f'sent again {self.resent}'
                 + (f' (ids {self.resent_ids[0]}-{self.resent_ids[1]})'
                    if self.resent_ids else ''),
                 f'renumbered {self.renumbered}']
        if self.echo is not None and (self.echo.rows or self.echo.purged_after is not None):
            parts.append(str(self.echo))
        if self.sequence is not None:
            parts.append(f'ids now after {self.sequence}')
        if self.purged_after is not None:
            parts.append(f'messages after id {self.purged_after} were purged '
                         '(retention) and cannot be sent again')
        return ', '.join(parts)


def heal(session: Session, peer: str, peer_received: int,
         peer_holds: int | None = None) -> Healing:
    """Start over from ``peer_received``, the highest of our ids the peer
    says it stored: send again what we delivered after it, and move
    undelivered messages (and the id sequence) past it.  ``peer_holds``:
    the highest of its own ids the peer says it holds; its own messages
    after that go back to it first (:mod:`.echoes`)."""
    healing = Healing()
    before = acknowledged(session, peer)
    # 1. What we delivered after what the peer holds goes again: only rows
    # already delivered, so nothing is sent that was not sent before.
    ids = session.execute(select(func.min(OUT.id), func.max(OUT.id), func.count())
                          .where(OUT.delivered_at.is_not(None), OUT.id > peer_received)
                          ).one()
    if ids[2]:
        session.execute(update(outbound_messages)
                        .where(OUT.delivered_at.is_not(None), OUT.id > peer_received)
                        .values(delivered_at=None))
        healing.resent, healing.resent_ids = ids[2], (ids[0], ids[1])
    if before > peer_received:
        oldest = session.execute(select(func.min(OUT.id))).scalar()
        if oldest is None or oldest > peer_received + 1:
            healing.purged_after = peer_received
    # 2. Undelivered ids the peer holds already: new ids past them.
    pending = session.execute(
        select(outbound_messages).where(OUT.delivered_at.is_(None), OUT.id <= peer_received)
        .order_by(OUT.id)).all()
    highest = session.execute(select(func.coalesce(func.max(OUT.id), 0))).scalar_one()
    following = max(highest, peer_received)
    if pending:
        rows = [{**row._mapping, 'id': following + n} for n, row in
                enumerate(pending, 1)]
        session.execute(insert(outbound_messages), rows)
        session.execute(delete(outbound_messages).where(
            one_of(OUT.id, [row.id for row in pending], session.get_bind().dialect.name)))
        healing.renumbered = len(pending)
        following += len(pending)
    if peer_holds is not None:
        following = _echo(session, peer, peer_holds, following, healing)
    # 3. The sequence: new messages get ids past everything the peer has.
    if following > highest:
        _move_sequence(session, following)
        healing.sequence = following
    queues.set_state(session, _acknowledged_key(peer), str(peer_received))
    queues._changed(session)
    return healing


def _echo(session: Session, peer: str, peer_holds: int, following: int,
          healing: Healing) -> int:
    """Queue the peer's lost messages of its own ahead of everything we
    have to send it: what waits gets ids after them.  The id the queue
    now follows."""
    healing.echo = echo = echoes.to_echo(session, peer, peer_holds)
    if not echo.rows:
        return following
    waiting = session.execute(select(outbound_messages).where(OUT.delivered_at.is_(None))
                              .order_by(OUT.id)).all()
    session.execute(insert(outbound_messages),
                    [{**row, 'id': following + n} for n, row in enumerate(echo.rows, 1)])
    following += len(echo.rows)
    if waiting:
        session.execute(delete(outbound_messages).where(
            one_of(OUT.id, [row.id for row in waiting], session.get_bind().dialect.name)))
        session.execute(insert(outbound_messages), [
            {**row._mapping, 'id': following + n} for n, row in enumerate(waiting, 1)])
        following += len(waiting)
        healing.resent_ids = None  # they go under new ids now
    return following


def _move_sequence(session: Session, past: int) -> None:
    """Make the next outbound id greater than ``past``, portably: an
    explicit id moves SQLite's ``sqlite_sequence`` (AUTOINCREMENT) and
    InnoDB's counter by itself, PostgreSQL's sequence needs ``setval``."""
    if session.get_bind().dialect.name == 'postgresql':
        sequence = session.execute(
            text("SELECT pg_get_serial_sequence('outbound_messages', 'id')")).scalar()
        if sequence:
            # Not transactional: taken at once, never handed out twice.
            session.execute(text('SELECT setval(CAST(:sequence AS regclass), '
                                 'GREATEST(:past, (SELECT last_value FROM '
                                 f'{sequence})))'),
                            {'sequence': sequence, 'past': past})
            return
    exists = session.execute(select(OUT.id).where(OUT.id == past)).scalar()
    if exists is None:
        session.execute(insert(outbound_messages).values(
            id=past, body='', format=1, created_at=utcnow(), delivered_at=utcnow()))
        session.execute(delete(outbound_messages).where(OUT.id == past))


# -- the exchange -------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Report:
    """What one side says of itself in a checkpoint (parsed: hostile)."""
    epoch: str
    #: Request: the client's recorded token; reply: the server's.
    recorded: str | None
    #: Request: the token to record now; reply: the verdict.
    second: str
    received: int
    acknowledged: int


def _parse(headers: Mapping[str, str], reply: bool) -> Report:
    """The checkpoint headers, each checked: a peer may send anything."""
    epoch = headers.get(EPOCH_HEADER, '')
    if not _EPOCH.fullmatch(epoch):
        raise WireError(f'{EPOCH_HEADER} must be 16-32 hex digits')
    parts = (headers.get(CHECKPOINT_HEADER) or '').split(' ')
    recorded = parts[0] if len(parts) == 2 else ''
    if len(parts) != 2 or not (recorded == '-' or _TOKEN.fullmatch(recorded)):
        raise WireError(f'{CHECKPOINT_HEADER} must be "<token or -> <'
                        + ('verdict' if reply else 'token') + '>"')
    second = parts[1]
    if (second not in VERDICTS) if reply else not _TOKEN.fullmatch(second):
        raise WireError(f'{CHECKPOINT_HEADER} has an invalid '
                        + ('verdict' if reply else 'new token'))
    numbers = []
    for header in (RECEIVED_HEADER, ACKNOWLEDGED_HEADER):
        value = headers.get(header, '')
        if not (value.isascii() and value.isdigit() and len(value) <= 16
                and int(value) <= MAX_ID):
            raise WireError(f'{header} must be an id from 0 to {MAX_ID}')
        numbers.append(int(value))
    return Report(epoch, None if recorded == '-' else recorded, second, *numbers)


def _headers(session: Session, peer: str | None, checkpoint: str) -> dict[str, str]:
    return {EPOCH_HEADER: own_epoch(session), CHECKPOINT_HEADER: checkpoint,
            RECEIVED_HEADER: str(queues.last_remote_id(session, peer) if peer else 0),
            ACKNOWLEDGED_HEADER: str(acknowledged(session, peer) if peer else 0)}


def _restored(mine: str | None, theirs: str | None, local_name: str, peer: str) -> str:
    """Which side the tokens say was restored: the one behind."""
    if _number(theirs) < _number(mine):
        return peer
    if _number(theirs) > _number(mine):
        return local_name
    return f'{local_name} or {peer}'


def _conclude(session: Session, local_name: str, peer: str, mine: str | None,
              theirs: Report, theirs_token: str | None, differs: bool) -> Healing | None:
    """Both sides, once the verdict is known: note the peer's epoch, and
    heal if the checkpoints differ."""
    known_epoch = _state(session, _peer_epoch_key(peer))
    if known_epoch is not None and known_epoch != theirs.epoch:
        log.warning('%s reports a new database identity (epoch %s, was %s): '
                    'restored or replaced', peer, theirs.epoch, known_epoch)
    if known_epoch != theirs.epoch:
        queues.set_state(session, _peer_epoch_key(peer), theirs.epoch)
    if not differs:
        return None
    restored = _restored(mine, theirs_token, local_name, peer)
    healing = heal(session, peer, theirs.received, theirs.acknowledged)
    if restored == local_name:  # this database came back from a backup
        queues.set_state(session, EPOCH_KEY, secrets.token_hex(8))
    line = (f'checkpoint with {peer} differs: {restored} restored from a backup (or a '
            f'checkpoint reply was lost); {peer} holds our ids up to {theirs.received}; '
            f'{healing}')
    log.warning('%s', line)
    queues.set_state(session, RESTORE_KEY, line[:255])
    return healing


def request_headers(session: Session) -> tuple[dict[str, str], str]:
    """Central: the checkpoint headers of a run's first request, and the
    new token they propose."""
    value = _state(session, CLIENT_KEY) or ''
    token, _, peer = value.partition(' ')
    if not _TOKEN.fullmatch(token):
        token = ''
    if not peer:  # before the first checkpoint: whom we pulled from
        last_pull = queues.get_states(session).get('last_pull_at')
        peer = (last_pull[0] or '') if last_pull else ''
    proposed = new_token(token or None)
    return _headers(session, peer or None, f'{token or "-"} {proposed}'), proposed


def conclude(session: Session, local_name: str, peer: str, proposed: str,
             reply: Mapping[str, str]) -> Healing | None:
    """Central, with the facade's reply: heal if the checkpoints differed,
    then record the new token (the facade recorded it too)."""
    theirs = _parse(reply, reply=True)
    value = _state(session, CLIENT_KEY) or ''
    mine = value.partition(' ')[0] or None
    healing = _conclude(session, local_name, peer, mine, theirs, theirs.recorded,
                        theirs.second == 'differs')
    queues.set_state(session, CLIENT_KEY, f'{proposed} {peer}')
    return healing


def serve(session: Session, local_name: str, peer: str,
          request: Mapping[str, str]) -> dict[str, str]:
    """The facade, in the request's transaction: compare the checkpoint
    central sends with ours, heal if they differ, record the new one; the
    reply headers.  Raises :class:`.wire.WireError` for malformed ones."""
    theirs = _parse(request, reply=False)
    recorded = (_state(session, _server_key(peer)) or '').split(' ')
    mine = recorded[0] or None
    previous = recorded[1] if len(recorded) > 1 and recorded[1] not in ('', '-') else None
    if theirs.recorded is None and mine is None:
        verdict = 'first'
    elif theirs.recorded == mine:
        verdict = 'same'
    elif theirs.recorded is not None and theirs.recorded == previous \
            and not _moved_since(session, peer, recorded[2:4]):
        # Central never recorded the token we did last time: that reply was
        # lost (or central stopped before it committed), and nothing else
        # of that run happened.  Not a restore: nothing to heal.
        log.info('the last checkpoint reply to %s was lost; going on from the one before',
                 peer)
        verdict = 'same'
    else:
        verdict = 'differs'
    if verdict == 'same' and (theirs.received < acknowledged(session, peer)
                              or queues.last_remote_id(session, peer) < theirs.acknowledged):
        # One side no longer holds what it acknowledged to the other: it
        # lost writes (a restore), whatever the tokens say.
        verdict = 'differs'
    # Central says what it holds of ours; what we hold of its, and of our
    # own, before anything changes, goes back so that it can heal too.
    holds = acknowledged(session, peer)
    _conclude(session, local_name, peer, mine, theirs, theirs.recorded,
              verdict == 'differs')
    # The one before is kept, to tell a lost reply from a restore, and
    # where both queues stood: the run went on past the reply if they move.
    queues.set_state(session, _server_key(peer),
                     f'{theirs.second} {mine or "-"} {queues.last_remote_id(session, peer)} '
                     f'{acknowledged(session, peer)}')
    return {**_headers(session, peer, f'{mine or "-"} {verdict}'),
            ACKNOWLEDGED_HEADER: str(holds)}


def _moved_since(session: Session, peer: str, marks: list[str]) -> bool:
    """Did the run of our last checkpoint exchange messages after it?  Then
    its reply was not lost: central went on from it, and a central that
    no longer holds it came back from a backup."""
    if len(marks) != 2 or not all(mark.isdigit() for mark in marks):
        return False  # recorded by an older version: as before
    return (queues.last_remote_id(session, peer) > int(marks[0])
            or acknowledged(session, peer) > int(marks[1]))

