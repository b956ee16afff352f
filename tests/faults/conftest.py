"""Fixtures of the fault harness, and its table in the terminal summary
(so CI logs show the figures) and in ``faults-table-<backend>.txt`` under
pytest's base temporary directory."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .harness import (
    FAULT_TIMEOUT,
    RECOVERY_TIMEOUT,
    RETRY_DELAY,
    FaultProxy,
    Pcommunicate,
    Rig,
    ScenarioResult,
    database_timeouts_url,
    fault_seed,
    format_notes,
    format_table,
    ini_with_timeout,
)

TABLE_KEY = pytest.StashKey[tuple[str, Path]]()


@pytest.fixture(scope='session')
def fault_seed_value() -> int:
    return fault_seed()


@pytest.fixture(scope='session')
def fault_table(pytestconfig, backend, tmp_path_factory,
                fault_seed_value) -> Iterator[list[ScenarioResult]]:
    """Scenario results of the whole run; the table is written once at the end."""
    results: list[ScenarioResult] = []
    yield results
    if results:
        table = (format_table(results, backend, fault_seed_value) + '\n\n'
                 + format_notes(results))
        path = tmp_path_factory.getbasetemp() / f'faults-table-{backend}.txt'
        path.write_text(table + '\n')
        pytestconfig.stash[TABLE_KEY] = (table, path)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    entry = config.stash.get(TABLE_KEY, None)
    if entry is None:
        return
    table, path = entry
    terminalreporter.section('fault harness')
    for line in table.splitlines():
        terminalreporter.write_line(line)
    terminalreporter.write_line(f'(also in {path})')


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
