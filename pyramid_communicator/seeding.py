"""Seeding: publish every existing record of a model, for a table that
held data before sync was enabled, or to rebuild a facade.

Records go in primary key order, a batch per transaction; the batch's
messages and the position reached (``publish_all:<name>`` in
``communicator_state``) commit together.  A run killed half way resumes
after the last committed batch, so no record is published twice by one
seeding, and memory stays that of one batch.
"""
from __future__ import annotations

from collections.abc import Callable

import transaction
from sqlalchemy import func, inspect, select
from sqlalchemy.orm import Session, selectin_polymorphic

from . import keys, queues
from .publishing import publish_records
from .records import receiver_for

Progress = Callable[[str, int, int], None]


def _state_key(name: str) -> str:
    return f'publish_all:{name}'


def publish_all(session: Session, tm: transaction.TransactionManager, name: str,
                batch_size: int, progress: Progress | None = None) -> int:
    """Publish every record of the model registered as ``name``; returns
    how many this call published (a resumed run counts from where it
    resumed)."""
    receiver = receiver_for(name)
    mapper = inspect(receiver.cls)
    order = list(mapper.primary_key)
    subclasses = [sub.class_ for sub in mapper.self_and_descendants
                  if sub is not mapper and sub.local_table is not mapper.local_table]
    key = _state_key(name)

    def beyond(position: str) -> object:
        # A keyed model resumes after the key's text (:mod:`.keys`).
        if receiver.keyed:
            return keys.after(receiver, position)
        return order[0] > int(position)

    with tm:
        state = queues.get_states(session).get(key)
        after = state[0] if state and state[0] else None
        remaining = select(func.count()).select_from(mapper.local_table)
        if after is not None:
            remaining = remaining.where(beyond(after))
        total = session.execute(remaining).scalar_one()
    done = 0
    while True:
        with tm:
            query = select(receiver.cls).order_by(*order).limit(batch_size)
            if subclasses:  # their own tables' columns: a query per subclass, not per record
                query = query.options(selectin_polymorphic(receiver.cls, subclasses))
            if after is not None:
                query = query.where(beyond(after))
            records = session.scalars(query).all()
            if not records:
                queues.delete_state(session, key)
                break
            publish_records(session, records)
            after = keys.text_of(receiver, records[-1]) if receiver.keyed else \
                str(mapper.primary_key_from_instance(records[-1])[0])
            queues.set_state(session, key, after)
        done += len(records)
        if progress is not None:
            progress(name, done, total)
    return done
