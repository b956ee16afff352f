"""The trust rule: what a peer may claim, checked before anything it sent
is believed.

Central sits in a private network so that a facade on the public
internet, even a compromised one, cannot reach central's data.  Every
inbound message is therefore read as a claim that must hold against
what this app knows:

- A peer may create records of its own origin only.  It may update or
  delete only identities that were shared with it: sent to it, or
  received from it (both leave a row in ``communicator_mappings``).  A
  local record found any other way (its natural key, a foreign key) that
  was never shared is refused, never merged, deleted or re-pointed.
- Only the app that owns an identity (its origin) starts a new life of it.
- A version may name the sender's own edits freely (within a day of our
  clock, :data:`.versions.FUTURE_LIMIT`).  It may name an edit of *this*
  app only up to what this app sent it and the peer received: never past
  this app's own clock of the record (a forgery, refused) and never an
  edit still waiting in our outbound queue (not delivered yet: the
  message waits and is retried).  Any other app's entries may not go past
  what this app holds of that record (so made-up apps cannot grow a
  version, and no third party's edit can be invented).
- A delete is stamped by the app that deleted: never by this app.

Without this, a peer could make its edits look causally newer than ours
(``authority()`` settles concurrent edits only) or claim our own edits.

This module holds the checks; :mod:`.applying` calls them where it has
found the local state.  Nothing here touches a database.
"""
from __future__ import annotations

from .versions import HERE, Incoming, Version


class Refused(Exception):
    """The peer may not do this.  The message is kept with the reason and
    not retried, unless an operator names it in ``pcommunicate --retry``."""


class NotDelivered(LookupError):
    """The message claims an edit of ours that is still in our outbound
    queue: the peer cannot have seen it yet (or its acknowledgement was
    lost).  A failure, retried once our queue has delivered it."""


def check_version(incoming: Incoming, local: Version | None, sender: str,
                  local_name: str, undelivered: int | None = None) -> None:
    """Refuse a version that claims more than ``sender`` can know.

    ``local``: this app's version of the record (or of its tombstone),
    None if there is none.  ``undelivered``: the smallest hlc of our own
    edits of the record still waiting in the outbound queue, if any.
    """
    known = local.clock if local is not None else {}
    ours = known.get(HERE, 0)

    def within(app: str, hlc: int, what: str) -> None:
        if app == sender:
            return
        if app == HERE:
            if hlc > ours:
                raise Refused(f'{sender} claims {what} by {local_name} that '
                              f'{local_name} never sent it')
            if undelivered is not None and hlc >= undelivered:
                raise NotDelivered(f'{sender} claims {what} by {local_name} that is not '
                                   'delivered yet; retried once it is')
            return
        if hlc > known.get(app, 0):
            raise Refused(f'{sender} claims {what} by {app!r}, which {local_name} does '
                          'not know of')

    for app, hlc in incoming.clock.items():
        within(app, hlc, 'to have seen an edit')
    for key, (hlc, app) in incoming.stamps.items():
        within(app, hlc, f'an edit of {key!r}')
    if incoming.deleted is not None:
        if incoming.deleted[1] == HERE:
            raise Refused(f'{sender} claims a delete by {local_name}')
        within(incoming.deleted[1], incoming.deleted[0], 'a delete')


def check_life(life: int, known: int, origin: str, sender: str, local_name: str) -> None:
    """Only the identity's origin hands its id to a new record."""
    if life > known and origin != sender:
        owner = local_name if origin == HERE else origin
        raise Refused(f'{sender} starts a new life of an identity of {owner}; '
                      'only its origin can')


def check_origin(origin: str, sender: str, versioned: bool, local_name: str) -> None:
    """A new identity must be the sender's own.  A gem peer (no versions,
    and no name of its own on the wire) may use any origin but ours."""
    if origin == HERE:
        return  # an own identity is never created by a peer: found or refused
    if versioned and origin != sender:
        raise Refused(f'{sender} may create records of its own origin only, not of '
                      f'{origin!r}')
