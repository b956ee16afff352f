"""The model-shape matrix as a table: every shape of ``tests/test_matrix.py``
× every pair of backends × both directions, passed or failed.

    .venv/bin/python benchmarks/matrix_report.py [PYTEST ARGS ...]

Runs ``pytest tests/test_matrix.py --matrix-all -m "slow or not slow"``
(every pair, whatever ``--db`` says; a pair whose server is not reachable
is skipped and shows as ``skip``) with any further arguments given (e.g.
``-n0``, ``-k deletes``), reads the cases' outcomes from pytest's JUnit
XML and prints one line per shape, one column per pair and direction
(in each cell: central sends, then the facade sends).  Exit status 1 when
a case failed.  Never a test.
"""
from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / 'tests'))
from test_matrix import DIRECTIONS, PAIRS, SHAPES  # noqa: E402

SHORT = {'postgresql': 'pg', 'mysql': 'mysql', 'sqlite': 'sqlite'}
CELL = {'passed': 'ok', 'failed': 'FAIL', 'skipped': 'skip', None: '-'}


def outcome(case: ET.Element) -> str:
    if case.find('failure') is not None or case.find('error') is not None:
        return 'failed'
    if case.find('skipped') is not None:
        return 'skipped'
    return 'passed'


def read_cases(path: Path) -> dict[tuple[str, str, str], str]:
    """(shape, pair, direction) -> outcome, from the ``matrix`` property
    every case records."""
    cases = {}
    for case in ET.parse(path).iter('testcase'):
        for prop in case.iter('property'):
            if prop.get('name') == 'matrix':
                shape, pair, direction = prop.get('value').split(' ')
                cases[shape, pair, direction] = outcome(case)
    return cases


def table(cases: dict[tuple[str, str, str], str]) -> str:
    """A line per shape, a column per pair (central/facade), in each cell
    the two directions: central sends, then the facade."""
    shapes = [shape.name for shape in SHAPES]
    shapes += sorted({shape for shape, _, _ in cases} - set(shapes))
    pairs = [f'{c}/{f}' for c, f in PAIRS]
    heads = ['/'.join(SHORT[db] for db in pair.split('/')) for pair in pairs]
    width = max(len(shape) for shape in [*shapes, 'shape'])
    cells_of = {shape: [' '.join(CELL[cases.get((shape, pair, direction))]
                                 for direction in DIRECTIONS) for pair in pairs]
                for shape in shapes}
    widths = [max(len(head), *(len(cells_of[shape][i]) for shape in shapes))
              for i, head in enumerate(heads)]
    lines = [' | '.join(['shape'.ljust(width)]
                        + [head.ljust(w) for head, w in zip(heads, widths, strict=True)])]
    lines.append('-+-'.join(['-' * width] + ['-' * w for w in widths]))
    for shape in shapes:
        lines.append(' | '.join([shape.ljust(width)] + [
            cell.ljust(w) for cell, w in zip(cells_of[shape], widths, strict=True)]))
    lines.append('(central/facade; each cell: central sends, then the facade sends)')
    return '\n'.join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    _, pytest_args = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / 'matrix.xml'
        started = time.monotonic()
        run = subprocess.run(
            [str(BIN / 'pytest'), 'tests/test_matrix.py', '--matrix-all',
             '-m', 'slow or not slow', '-q', '-p', 'no:cacheprovider',
             f'--junitxml={junit}', *pytest_args],
            cwd=ROOT, capture_output=True, text=True)
        seconds = time.monotonic() - started
        if not junit.exists():
            print(run.stdout[-3000:] + run.stderr[-3000:], file=sys.stderr)
            return 2
        cases = read_cases(junit)
    if not cases:
        print('no matrix cases ran', file=sys.stderr)
        print(run.stdout[-3000:], file=sys.stderr)
        return 2
    counts = collections.Counter(cases.values())
    print(table(cases))
    print()
    print(f'{len(cases)} cases: {counts["passed"]} passed, {counts["failed"]} failed, '
          f'{counts["skipped"]} skipped; {seconds:.1f} s (pytest exit status {run.returncode})')
    if counts['failed']:
        print('\n' + run.stdout[-6000:])
    return 1 if counts['failed'] else 0


if __name__ == '__main__':
    sys.exit(main())
