"""Faults between two real apps over real HTTP: ``kill -9`` of
pcommunicate, a proxy that loses replies, fails or stalls, and a facade
database that refuses writes; and both sides editing (and deleting) the
same Tags before, between and during runs that meet those faults. After
each scenario, runs without faults must bring both sides to the same
state (no divergence) with nothing lost, duplicated or applied out of
order (for Tags: the value last written wins, a deleted tag stays gone).
Restores (``restore_facade``, ``restore_central``): one side's database
put back from an earlier backup, with runs around it (one killed in
flight on odd runs); what that side wrote after the backup and never
sent is gone by the nature of a restore and not counted as lost, all the
rest must survive (see :func:`harness.restore_side`). In
``restore_facade_sent`` and ``restore_central_sent`` the restored side
also writes and sends records of its own, and edits of the peer's records
it owns, between backup and restore: what the peer holds of them must
come back (echoes).

Short by default; ``COMMUNICATOR_FAULT_RUNS=50 pytest -m faults -s`` for
a long run (``COMMUNICATOR_FAULT_SEED`` replays one).
"""
from __future__ import annotations

import random

import pytest

from .harness import SCENARIOS, format_notes, format_table, run_scenario, scenario_runs

pytestmark = pytest.mark.faults

#: Faults timed by a random delay or by watching progress may land after
#: the run ended; the others hit on every run.
MAY_MISS = {'kill_while_applying', 'kill_random_time', 'facade_db_locked'}


@pytest.mark.parametrize('name', list(SCENARIOS))
def test_fault_scenario(name, make_rig, record_fault, fault_seed_value, backend):
    rig = make_rig(db_timeouts=name == 'facade_db_locked')
    rng = random.Random(f'{fault_seed_value}:{name}')

    result = run_scenario(rig, name, scenario_runs(name), rng)
    record_fault(name, result)
    print('\n' + format_table([result], backend, fault_seed_value))
    print(format_notes([result]))

    figures = result.figures
    problems = '\n'.join(figures.problems[:40])
    assert result.recovery_exits[-1] == 0, result.last_recovery_output
    assert (figures.lost, figures.duplicated, figures.out_of_order) == (0, 0, 0), problems
    assert figures.divergences == 0, problems
    assert figures.final_states_equal, problems
    assert not result.crashes, result.crashes[0]
    if name not in MAY_MISS:
        assert result.faults_hit == result.runs
    elif name == 'facade_db_locked':
        assert result.faults_hit > 0  # every other run locks before it starts
