"""Plain messages under faults: a ``kill -9`` of pcommunicate while it
applies pulled messages, and lost replies of the pull and of its
acknowledgement, never run a handler's transaction twice nor lose one.

The demo's contact form is the workload: the facade sends
``contact.submitted``; central's handler keeps a row naming the message
(origin, id) and sends ``contact.acknowledged`` back, whose handler marks
the facade's row.  A handler run committed twice would show as two rows
for one message at central, or two acknowledgements in its queue.
"""
from __future__ import annotations

import collections
import itertools
import json

import pytest

from pyramid_communicator import send
from pyramid_communicator.demo.models import ContactRequest
from pyramid_communicator.messages import SETTINGS_INFO
from pyramid_communicator.settings import parse_settings

from .harness import Fault, wait_until

pytestmark = pytest.mark.faults


def submit(rig, count: int, prefix: str) -> None:
    """``count`` contact forms at the facade, as its view sends them."""
    settings = parse_settings({'communicator.name': 'facade', 'communicator.username': 'u',
                               'communicator.password': 'p'})
    with rig.facade.session() as session:
        session.info[SETTINGS_INFO] = settings
        for n in range(count):
            row = ContactRequest(name=f'{prefix} {n}', email=f'{prefix}{n}@example.org',
                                 text='hello', status='sent')
            session.add(row)
            session.flush()
            send(session, 'contact.submitted', {'ref': row.id, 'name': row.name,
                                                'email': row.email, 'text': row.text},
                 key=row.email)


def recover(rig, runs: int = 4) -> None:
    rig.proxy.disarm()
    for _ in range(runs):
        rig.proxy.wait_idle()
        outcome = rig.runner.run(rig.recovery_ini)
        assert outcome.returncode == 0 and not outcome.crashed, outcome.output
    assert rig.facade.count('outbound_messages', 'delivered_at IS NULL') == 0
    assert rig.central.count('outbound_messages', 'delivered_at IS NULL') == 0


def handled_once(rig, total: int) -> None:
    """Each message handled once, none lost, in the order sent; the figures
    are printed as the fault table's row for messages."""
    received = rig.central.rows('contact_requests')  # in the order handled
    per_message = collections.Counter((r['origin'], r['message_id']) for r in received)
    order = [r['message_id'] for r in received]
    lost = total - len(per_message)
    duplicated = sum(count - 1 for count in per_message.values())
    out_of_order = sum(1 for a, b in itertools.pairwise(order) if b < a)
    print(f'\nmessages: sent {total}, lost {lost}, duplicated {duplicated}, '
          f'out of order {out_of_order}')
    assert (lost, duplicated, out_of_order) == (0, 0, 0), order
    acks = [json.loads(row['body'])['@message']['payload']['ref']
            for row in rig.central.rows('outbound_messages')]
    assert sorted(acks) == sorted(r['ref'] for r in received)  # one each
    statuses = collections.Counter(r['status'] for r in rig.facade.rows('contact_requests'))
    assert statuses == {'acknowledged': total}
    failed = rig.central.count('inbound_messages', 'processed_at IS NULL')
    assert failed == 0


def test_kill_9_while_handlers_run(make_rig):
    rig = make_rig()
    size = 200
    submit(rig, size, 'killed')
    done = 'processed_at IS NOT NULL'
    process = rig.runner.start()
    reached = wait_until(lambda: process.poll() is not None
                         or rig.central.count('inbound_messages', done) >= size // 3, 60, 0.005)
    outcome = rig.runner.kill(process)
    assert reached
    applied_when_killed = rig.central.count('inbound_messages', done)
    recover(rig)
    handled_once(rig, size)
    # Killed in the middle (most runs), or after the end on a fast machine.
    assert outcome.killed or applied_when_killed == size


@pytest.mark.parametrize('method, path', [('GET', '/messages.json'),
                                          ('POST', '/messages/delivered.json')])
def test_a_lost_reply_never_runs_a_handler_twice(make_rig, method, path):
    rig = make_rig()
    submit(rig, 30, 'lost')
    fault = rig.proxy.arm(Fault('drop_after', method, path))
    try:
        rig.runner.run()
    finally:
        rig.proxy.disarm(fault)
    assert fault.fired.is_set()
    recover(rig)
    handled_once(rig, 30)
