"""Foreign keys *to* keyed models: the record they name must be one the
peer knows.

A foreign key to a surrogate-keyed model travels through ``refs`` (the
identity of the target) because its raw value is an id of the sender's
database.  A foreign key to a keyed model (:mod:`.keys`: a currency code,
a UUID) holds the target's key, which is the same on every side: its raw
value already names the record here.  So it stays a raw key in the body
and is checked where it is applied, not moved into ``refs``:

- the wire of integer-keyed records stays the gem's (an ``Order`` with a
  ``currency_code`` gains no ``refs`` entry that a gem peer would try to
  resolve as an integer identity), and nothing changes for publishers or
  for peers that predate this check;
- a key names exactly one record here, so the check cannot be fooled by
  a claimed origin: the record it names is found by its key, and it must
  hold an identity (a row of ``communicator_mappings``: sent to the peer
  or received from it), the rule ``match_on`` and keyed records follow
  (:meth:`.applying._Application.shared`).

A key naming a record of ours that was never shared is refused
(:class:`.trust.Refused`) and nothing of the message is written; one
naming a record that was published but whose first message still waits
in our outbound queue fails with :class:`.trust.NotDelivered` and is
retried once it went; one naming a record that is not here (yet) fails
and is retried, as a reference through ``refs`` does, so a record whose
target arrives later in the batch or the run applies then.

Composite foreign keys to composite-keyed models are checked the same
way (every part sent, in the target's key order), unless a part of the
target's key is itself a foreign key mapped through ``refs``: the
referring record would hold the sender's own id there, which means
nothing here, so such a message is refused with that reason.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, inspect, select

from . import keys
from .models import outbound_messages
from .records import (
    NAME_PREFIX,
    Receiver,
    WireTypeError,
    body_name,
    from_wire,
    receiver_of_table,
)
from .trust import NotDelivered, Refused
from .versions import HERE

if TYPE_CHECKING:
    from .working_set import Identity, WorkingSet

OUT = outbound_messages.c


@dataclasses.dataclass(frozen=True)
class KeyReference:
    """One foreign key constraint of a synced model to a keyed one."""
    target: Receiver
    #: (attribute of the referring model, key attribute of the target), in
    #: the order of the target's primary key.
    pairs: tuple[tuple[str, str], ...]
    #: Why it cannot be checked (then every non-null value is refused).
    unsupported: str | None = None

    @property
    def attributes(self) -> str:
        names = [local for local, _ in self.pairs]
        return names[0] if len(names) == 1 else f'({", ".join(names)})'


def key_references(receiver: Receiver) -> tuple[KeyReference, ...]:
    """The foreign keys of ``receiver``'s crossing columns that point at
    the primary key of a keyed synced model."""
    found = _found.get(id(receiver))
    if found is None or found[0] is not receiver:
        found = _found[id(receiver)] = (receiver, _key_references(receiver))
    return found[1]


#: id(receiver) -> (receiver, its key references), computed once the
#: mappers are configured (first use), as :meth:`.Receiver.references`.
_found: dict[int, tuple[Receiver, tuple[KeyReference, ...]]] = {}


def _key_references(receiver: Receiver) -> tuple[KeyReference, ...]:
    # The registered class's and its subclasses' (inheritance) own tables.
    columns = receiver.all_columns()
    by_column = {column: key for key, column in columns.items()}
    tables = dict.fromkeys(mapper.local_table
                           for mapper in inspect(receiver.cls).self_and_descendants)
    constraints = [constraint for table in tables
                   for constraint in table.foreign_key_constraints]
    found = []
    for constraint in constraints:
        target = receiver_of_table(constraint.referred_table)
        if target is None or not target.keyed:
            continue
        target_mapper = inspect(target.cls)
        target_pk = list(target_mapper.primary_key)
        referred = [element.column for element in constraint.elements]
        if sorted(map(id, referred)) != sorted(map(id, target_pk)):
            continue  # not to its primary key: a unique column, sent as it is
        local_of = {}
        for element in constraint.elements:
            local = by_column.get(element.parent)
            if local is None:
                break  # a part that does not cross: nothing of it arrives
            local_of[id(element.column)] = local
        else:
            pairs = tuple((local_of[id(column)],
                           target_mapper.get_property_by_column(column).key)
                          for column in target_pk)
            mapped = [key for _, key in pairs if key in target.references()]
            unsupported = None
            if mapped and len(pairs) > 1:
                unsupported = (f'{target.name}, whose key part {mapped[0]} is a foreign key '
                               'mapped through refs (an id of the sender): such a composite '
                               'foreign key cannot be synced')
            found.append(KeyReference(target, pairs, unsupported))
    return tuple(found)


def targets(receiver: Receiver, attributes: dict[str, Any],
            ) -> Iterator[tuple[Receiver, dict[str, Any]]]:
    """(target, its key as wire values) for each foreign key to a keyed
    model that ``attributes`` fill in: what a batch loads up front."""
    for reference in key_references(receiver):
        if reference.unsupported is not None:
            continue
        sent = {key: attributes.get(local) for local, key in reference.pairs}
        if any(value is None for value in sent.values()):
            continue
        columns = reference.target.columns()
        try:
            for key, value in sent.items():
                from_wire(columns[key], value)
        except (WireTypeError, ValueError, TypeError):
            continue  # refused when applied, with its reason
        yield reference.target, sent


def check(work: WorkingSet, receiver: Receiver, attributes: dict[str, Any], sender: str) -> None:
    """Refuse a record whose foreign key names a keyed record of ours the
    sender does not know; fail (retried) if it names one not here yet.
    ``attributes``: the wire values the message sent."""
    for reference in key_references(receiver):
        sent = [attributes.get(local) for local, _ in reference.pairs]
        if any(value is None for value in sent):
            continue  # no reference (a null part: SQL's MATCH SIMPLE)
        what = f'{receiver.name}.{reference.attributes}'
        if reference.unsupported is not None:
            raise Refused(f'{sender} sent {what}, which refers to {reference.unsupported}')
        target = reference.target
        named = {key: value for (_, key), value in zip(reference.pairs, sent, strict=True)}
        target_columns = target.columns()
        try:
            values = tuple(from_wire(target_columns[key], named[key], work.dialect)
                           for key in target.primary_key)
            key_text = keys.text(values)
        except (keys.BadKey, WireTypeError, ValueError, TypeError) as exc:
            raise Refused(f'{sender} sent {what} that is no key of {target.name}: '
                          f'{str(exc)[:120]}') from None
        record = work.match(target, named)
        if record is None:
            raise LookupError(f'{what} refers to {target.name} {key_text[:60]}, which is '
                              'not here (yet)')
        identities = work.aliases.get(id(record), ())
        if not identities:
            raise Refused(f'{sender} sent {what} referring to {target.name} '
                          f'{key_text[:60]} of {work.local_name}, which was never sent to it')
        if all(identity.origin == HERE for identity in identities):
            _delivered(work, target, record, identities, what, key_text)


def _delivered(work: WorkingSet, target: Receiver, record: object,
               identities: list[Identity], what: str, key_text: str) -> None:
    """A record of ours, published: the peer can know it only once one of
    its messages went.  Waiting in the queue with none delivered yet is a
    failure retried (a delivered message that retention purged since
    counts as never delivered: the reference waits for the queue)."""
    if work.undelivered(record) is None:
        return
    handles = sorted({identity.original_id for identity in identities})
    rows = work.session.execute(
        select(func.substr(OUT.body, 1, NAME_PREFIX), OUT.origin)
        .where(OUT.original_id.in_(handles), OUT.delivered_at.is_not(None))).all()
    for head, origin in rows:
        if body_name(head) == target.name and origin in (None, work.local_name):
            return
    raise NotDelivered(f'{what} refers to {target.name} {key_text[:60]} of '
                       f'{work.local_name}, whose message is not delivered yet; retried once '
                       'it is')
