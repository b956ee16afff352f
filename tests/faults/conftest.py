"""Fixtures of the fault harness. Its table (in the terminal summary, so
that CI logs show the figures, and in ``faults-table-<backend>.txt`` under
pytest's base temporary directory) is made in pytest's main process by
``FaultTable`` in tests/conftest.py, also when pytest-xdist runs the
scenarios in workers."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from conftest import FAULT_RESULT, FAULT_SEED

from .harness import (
    FAULT_TIMEOUT,
    RECOVERY_TIMEOUT,
    RETRY_DELAY,
    FaultProxy,
    Pcommunicate,
    Rig,
    ScenarioResult,
    database_timeouts_url,
    ini_with_timeout,
)


@pytest.fixture(scope='session')
def fault_seed_value(pytestconfig) -> int:
    """One seed for the whole run, chosen in the main process and handed to
    every pytest-xdist worker (``COMMUNICATOR_FAULT_SEED`` replays one)."""
    return pytestconfig.stash[FAULT_SEED]


@pytest.fixture
def record_fault(request) -> Callable[[str, ScenarioResult], None]:
    """``record_fault(name, result)``: a scenario's row for the run's table;
    it travels in the test's report to pytest's main process."""
    def record(name: str, result: ScenarioResult) -> None:
        request.node.user_properties.append((FAULT_RESULT, (name, result.to_json())))
    return record


@pytest.fixture
def make_rig(backend, make_side, serve, make_central) -> Iterator[Callable[..., Rig]]:
    """``make_rig(db_timeouts=False)``: a served facade, the proxy in front
    of it and central pointed at the proxy with a short timeout.

    ``db_timeouts`` gives the facade short lock waits on PostgreSQL and
    MariaDB, so that a locked table fails its requests quickly. Both apps
    retry failed inbound messages after ``RETRY_DELAY`` seconds instead of
    the default 30, so that the bounded recovery runs see the retries.
    """
    made: list[Rig] = []

    def make(db_timeouts: bool = False) -> Rig:
        facade_side = make_side('facade')
        overrides = {'communicator.retry_delay': RETRY_DELAY}
        if db_timeouts:
            overrides['sqlalchemy.url'] = database_timeouts_url(facade_side.url)
        facade_server = serve(facade_side, **overrides)
        proxy = FaultProxy(facade_server.url)
        central = make_central(make_side('central'), proxy.url, **{
            'communicator.timeout': FAULT_TIMEOUT,
            'communicator.lock_wait': 5,
            'communicator.retry_delay': RETRY_DELAY,
        })
        rig = Rig(backend=backend, central=central.side, facade=facade_side,
                  facade_server=facade_server, proxy=proxy,
                  runner=Pcommunicate(central.ini),
                  recovery_ini=ini_with_timeout(central.ini, RECOVERY_TIMEOUT, 'recovery'),
                  batch_size=50)
        made.append(rig)
        return rig
    yield make
    for rig in made:
        rig.proxy.close()
        rig.runner.close()
