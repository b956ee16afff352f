"""Publishing and applying cost a constant number of statements per flush
and per batch, not several per record (counted on the real database, so
a change that brings back per-record queries shows up here)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections import Counter
from collections.abc import Iterator

import pytest
from conftest import versioned
from sqlalchemy import event, select
from sqlalchemy.engine import Engine
from test_records import deliver, settings_of
from test_views import basic

from pyramid_communicator.demo.models import Comment, Post, Tag
from pyramid_communicator.sync import apply_inbound
from pyramid_communicator.wire import WireMessage


@contextlib.contextmanager
def statements(side) -> Iterator[Counter]:
    """Count statements by (verb, table) on the side's database; the
    counts are there once the block is over."""
    counts: Counter = Counter()
    with executed(side) as seen:
        yield counts
    for statement, _, _ in seen:
        match = re.match(r'\s*(SELECT|INSERT INTO|UPDATE|DELETE FROM)\s.*?'
                         r'(?:FROM\s+)?(\w+)', statement, re.S | re.I)
        if match:
            verb = match.group(1).split()[0].upper()
            table = re.search(r'(?:FROM|INTO|UPDATE)\s+(\w+)', statement, re.I)
            counts[(verb, table.group(1) if table else '?')] += 1


@contextlib.contextmanager
def executed(side) -> Iterator[list]:
    """The statements (SQL, parameters, executemany) run on the side's
    database, by any engine (an app in process has its own)."""
    seen: list = []

    def keep(conn, cursor, statement, parameters, context, executemany):
        if conn.engine.url == side.engine.url:
            seen.append((statement, parameters, executemany))

    event.listen(Engine, 'before_cursor_execute', keep)
    try:
        yield seen
    finally:
        event.remove(Engine, 'before_cursor_execute', keep)


def ours(counts: Counter) -> Counter:
    return Counter({key: n for key, n in counts.items()
                    if key[1].startswith(('communicator_', 'outbound_', 'inbound_'))})


def autopublish_tags(side, count: int, start: int) -> Counter:
    with statements(side) as counts, side.session() as session:
        session.add_all(Tag(name=f'tag {start + i}', label='x') for i in range(count))
        session.flush()
    return ours(counts)


def test_autopublishing_a_flush_costs_the_same_statements_for_2_or_50_records(make_side):
    # (One new record may take a single statement: the next test.)
    side = make_side('central')
    two = autopublish_tags(side, 2, 0)
    fifty = autopublish_tags(side, 50, 100)
    assert two == fifty, (two, fifty)
    # versions and deletes of the same natural key (match_on) read in one
    # statement, identities written, messages written
    assert sum(two.values()) <= 3, two
    assert side.count('outbound_messages') == 52

    with statements(side) as counts, side.session() as session:
        for tag in session.scalars(select(Tag)):
            tag.label = 'edited'
    # versions read (and locked by primary key on PostgreSQL and MariaDB),
    # versions written, messages written
    assert sum(ours(counts).values()) <= 4, counts
    assert side.count('outbound_messages') == 104


@pytest.mark.backends('postgresql')
def test_a_request_creating_one_record_publishes_it_in_one_statement(make_side):
    """The common request, one record created, pays one round trip for
    publishing on PostgreSQL: its identity and its message in one statement."""
    side = make_side('central')
    with executed(side) as plain, side.session() as session:
        session.add(Post(title='not autopublished'))
    assert [s.split()[:3] for s, _, _ in plain] == [['INSERT', 'INTO', 'posts']]
    # a match_on model, and one without (its foreign key None)
    for record, table in ((Tag(name='one', label='x'), 'tags'), (Comment(body='one'), 'comments')):
        with executed(side) as seen, side.session() as session:
            session.add(record)
        assert [s.split()[:3] for s, _, _ in seen[:1]] == [['INSERT', 'INTO', table]]
        assert len(seen) == 2, [s for s, _, _ in seen]
    assert side.count('outbound_messages') == 2
    assert side.count('communicator_mappings', "origin = '' AND local_id = original_id") == 2


def test_autopublishing_a_model_without_match_on_costs_constant_statements(make_side):
    side = make_side('central')
    with side.session() as session:
        post = Post(title='parent')
        session.add(post)
        session.flush()
        post_id = post.id
    for count in (1, 30):
        with statements(side) as counts, side.session() as session:
            session.add_all(Comment(post_id=post_id, body=f'c{i}') for i in range(count))
        # versions of the comments and of the post they point at, identities
        # written, messages written
        assert sum(ours(counts).values()) <= 4, counts


def test_one_flush_publishes_in_flush_order(make_side):
    side = make_side('central')
    with side.session() as session:
        post = Post(title='parent')
        session.add(post)
        session.flush()
        session.add_all([Comment(post_id=post.id, body=f'c{i}') for i in range(5)])
    bodies = [json.loads(row['body']) for row in side.rows('outbound_messages')]
    assert [b['comment']['body'] for b in bodies] == [f'c{i}' for i in range(5)]


def test_applying_a_batch_reads_metadata_with_a_constant_number_of_queries(make_side):
    facade = make_side('facade')
    for size in (5, 40):
        first = 1000 * size
        deliver(facade, *[WireMessage(first + i, json.dumps({'tag': {'name': f'n{first + i}'}}),
                                      'central', first + i) for i in range(size)],
                sender='central')
        # No purge: it reads tombstones (mappings) of its own.
        settings = dataclasses.replace(settings_of(facade), batch_size=100, retention_days=0)
        with statements(facade) as counts:
            assert apply_inbound(facade.engine, settings).applied == size
        per_table = {table: n for (verb, table), n in counts.items() if verb != 'SELECT'}
        reads = sum(n for (verb, table), n in counts.items()
                    if verb == 'SELECT' and table in ('communicator_mappings', 'tags'))
        assert reads <= 3, counts  # identities, match_on candidates, aliases
        # One multi-row insert (on psycopg a COPY, which passes by
        # SQLAlchemy's statement events: none counted, the rows are there).
        assert per_table.get('communicator_mappings', 0) <= 1
        assert len([r for r in facade.rows('communicator_mappings')
                    if r['original_id'] >= first]) == size
        assert per_table['inbound_messages'] == 1  # one claim


#: The add-on's tables, in SQL.
OUR_TABLES = r'(communicator_\w+|outbound_messages|inbound_messages)'


def full_reads(side, seen: list) -> list[str]:
    """Plan lines of our statements that read a table of ours whole, or
    all the rows of a model (an index searched by the model's name alone):
    work that grows with the history kept, on every publish or batch."""
    found = []
    with side.engine.connect() as connection:
        for statement, parameters, executemany in seen:
            reads = statement.lstrip().upper().startswith(('SELECT', 'UPDATE', 'DELETE'))
            if executemany or not reads or not re.search(rf'\b{OUR_TABLES}\b', statement):
                continue
            plan = connection.exec_driver_sql('EXPLAIN QUERY PLAN ' + statement,
                                              parameters).all()
            for line in (row[-1] for row in plan):
                ours = re.search(rf'(SCAN|SEARCH) {OUR_TABLES}\b(.*)', line)
                if ours is None or ours.group(2) == 'communicator_state':
                    continue  # a row per fact and peer: read whole on purpose
                first_only = 'LIMIT' in statement and 'ORDER BY' not in statement
                if ours.group(1) == 'SCAN' or (ours.group(3).endswith('(name=?)')
                                               and not first_only):
                    found.append(f'{line}  <-  {" ".join(statement.split())[:300]}')
    return found


@pytest.mark.backends('sqlite')
def test_publishing_and_applying_search_indexes_instead_of_reading_history(make_side):
    """With history kept, a publish or a batch must cost the same as on an
    empty database (an OR of two mapping conditions once made SQLite read
    every mapping of the model on every publish of a new record)."""
    central, facade = make_side('central'), make_side('facade')
    with executed(central) as seen:
        with central.session() as session:  # creates (and the reused-id lookup)
            session.add_all([Tag(name=f'tag {i}', label='x') for i in range(3)]
                            + [Post(title='post')])
        with central.session() as session:  # updates and a delete
            tags = session.scalars(select(Tag).order_by(Tag.id)).all()
            tags[0].label = 'edited'
            session.delete(tags[1])
    assert seen
    found = full_reads(central, seen)
    assert not found, '\n'.join(found)

    deliver(facade, *[WireMessage(i, json.dumps({'tag': {'name': f'n{i}', 'label': 'y'}}),
                                  'central', i) for i in range(1, 6)], sender='central')
    with executed(facade) as seen:
        assert apply_inbound(facade.engine, settings_of(facade)).applied == 5
    assert seen
    found = full_reads(facade, seen)
    assert not found, '\n'.join(found)


@pytest.mark.backends('sqlite')
def test_the_server_s_exchanges_search_indexes_instead_of_reading_history(make_side, webapp):
    """A push to the server, a pull from it and its acknowledgement: each
    statement is an index search, as cheap with history kept as without."""
    facade = make_side('facade')
    app = webapp(facade)
    auth = basic()
    with facade.session() as session:
        session.add_all([Tag(name=f'served {i}', label='x') for i in range(3)])
    with executed(facade) as seen:
        pushed = [versioned({'id': i, 'body': json.dumps({'tag': {'name': f'pushed {i}'}}),
                             'origin': 'central', 'original_id': i}, 'central')
                  for i in range(1, 4)]
        app.post('/messages.json', json.dumps(pushed), status=202, headers={
            **auth, 'Content-Type': 'application/json', 'X-Communicator-Name': 'central'})
        served = app.get('/messages.json?from_id=1&pending=1', status=200, headers={
            **auth, 'Accept': 'application/json', 'X-Communicator-Name': 'central'}).json
        app.post_json('/messages/delivered.json', {'ids': [m['id'] for m in served]},
                      status=200, headers={**auth, 'X-Communicator-Name': 'central'})
    assert len(served) == 3 and facade.count('tags') == 6
    assert any('inbound_messages.remote_id' in statement for statement, _, _ in seen)  # stored
    found = full_reads(facade, seen)
    assert not found, '\n'.join(found)
