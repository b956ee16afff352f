"""Inserting many rows into one of our own tables.

SQLAlchemy sends an executemany of plain INSERTs through psycopg as one
statement per row in a pipeline, and a multi-row VALUES statement is
parsed anew by psycopg on every batch (it only caches short statements).
``COPY ... FROM STDIN`` takes the rows as a stream instead: on
PostgreSQL it writes a batch's mappings in about a third of the time.
Other drivers get the executemany (PyMySQL turns it into multi-row
statements itself; SQLite runs in process).

Only for tables of ours: COPY passes by SQLAlchemy's events and type
processing, so the values must be plain ``int``/``str``/``None``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Table
from sqlalchemy.engine import Connection

#: Rows per executemany, where COPY is not used.
CHUNK = 500


def copies(connection: Connection) -> bool:
    """Does :func:`insert_rows` stream rows with COPY here?  (A COPY cannot
    skip duplicates: callers that would rather ignore them than fail ask.)"""
    return connection.dialect.driver == 'psycopg'


def insert_rows(connection: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """INSERT ``rows`` (dicts with the same keys) into ``table``, inside
    the connection's transaction."""
    if not rows:
        return
    if copies(connection) and len(rows) > 1:
        _copy(connection, table, rows)
        return
    statement = table.insert()
    for start in range(0, len(rows), CHUNK):
        connection.execute(statement, rows[start:start + CHUNK])


def _copy(connection: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    columns = list(rows[0])
    preparer = connection.dialect.identifier_preparer
    sql = (f'COPY {preparer.format_table(table)} '
           f'({", ".join(preparer.quote(c) for c in columns)}) FROM STDIN')
    cursor = connection.connection.driver_connection.cursor()
    try:
        with cursor.copy(sql) as copy:
            for row in rows:
                copy.write_row([row[c] for c in columns])
    finally:
        cursor.close()
