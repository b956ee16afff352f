"""Seeding: ``pcommunicate --publish-all NAME`` publishes the records a
table held before sync was enabled, resumably."""
from __future__ import annotations

import os
import signal
import subprocess
import time

from conftest import BIN
from sqlalchemy import text
from test_end_to_end import summary

from pyramid_communicator.demo.models import Post


def insert_posts(side, count: int) -> None:
    """Records written before sync was enabled: nothing published."""
    with side.session() as session:
        session.add_all(Post(title=f'old {i}', body='b') for i in range(count))


def published_ids(side) -> list[int]:
    with side.engine.connect() as conn:
        return [row[0] for row in conn.execute(text(
            'SELECT original_id FROM outbound_messages ORDER BY id'))]


def test_publish_all_sends_existing_records(pair):
    central, facade = pair
    insert_posts(central.side, 23)
    result = central.pcommunicate('--publish-all', 'post')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'published 23 post record(s)'
    assert sorted(published_ids(central.side)) == [r['id'] for r in central.side.rows('posts')]
    assert not [r for r in central.side.rows('communicator_state', order_by='updated_at')
                if r['key'].startswith('publish_all:')]

    assert summary(central.sync())['pushed'] == 23
    assert sorted(r['title'] for r in facade.side.rows('posts')) == sorted(
        r['title'] for r in central.side.rows('posts'))


def test_publish_all_of_an_unknown_model_is_a_usage_error(pair):
    central, _ = pair
    result = central.pcommunicate('--publish-all', 'no_such_model')
    assert result.returncode == 2
    assert result.stderr.strip() == "pcommunicate: no model receives_from 'no_such_model'"


def test_publish_all_resumes_after_kill_9_without_duplicates(make_side, make_central):
    side = make_side('central')
    central = make_central(side, None, **{'communicator.batch_size': '20'})
    insert_posts(side, 4000)
    process = subprocess.Popen([str(BIN / 'pcommunicate'), str(central.ini),
                                '--publish-all', 'post'],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if side.count('outbound_messages') >= 100:  # some batches committed
            break
        time.sleep(0.02)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    first = side.count('outbound_messages')
    assert first >= 100

    result = central.pcommunicate('--publish-all', 'post')
    assert result.returncode == 0, result.stderr
    ids = published_ids(side)
    assert sorted(ids) == [r['id'] for r in side.rows('posts')]  # each exactly once
    resumed = int(result.stdout.split()[1])
    assert resumed == 4000 - first
