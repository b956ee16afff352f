"""Restores (:mod:`pyramid_communicator.restores`): a real pair, one side's
database put back from a backup taken mid-history; records made and
edited on both sides after the restore.  After a run or two nothing is
lost or duplicated and both sides hold the same records.

The backup is the backend's own: SQLite's backup API, ``pg_dump -Fc`` /
``pg_restore``, ``mysqldump``.
"""
from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
import requests
from conftest import Central, Server, Side
from sqlalchemy.engine import make_url
from test_end_to_end import central_post, execute, posts_by_title

from pyramid_communicator.demo.models import Tag

pytestmark = pytest.mark.slow


class Backup:
    """A copy of one side's database, to put back later."""

    def __init__(self, side: Side, directory: Path) -> None:
        self.side = side
        self.url = make_url(side.url)
        self.backend = self.url.get_backend_name()
        self.path = directory / f'{side.name}.backup'
        self.take()

    def _run(self, *argv: str, stdin=None, stdout=None) -> None:
        subprocess.run(argv, check=True, stdin=stdin, stdout=stdout, timeout=120)

    def _tool(self, name: str) -> str:
        tool = shutil.which(name)
        if tool is None:
            pytest.skip(f'{name} is not installed')
        return tool

    def take(self) -> None:
        if self.backend == 'sqlite':
            with sqlite3.connect(self.url.database) as live, \
                    sqlite3.connect(self.path) as copy:
                live.backup(copy)
        elif self.backend == 'postgresql':
            self._run(self._tool('pg_dump'), '-Fc', '-h', self.url.host or '127.0.0.1',
                      '-U', self.url.username or 'postgres', '-f', str(self.path),
                      self.url.database)
        else:
            with self.path.open('wb') as out:
                self._run(self._tool('mysqldump'), '-h', self.url.host or '127.0.0.1',
                          f'-u{self.url.username or "root"}', self.url.database, stdout=out)

    def restore(self) -> None:
        self.side.engine.dispose()
        if self.backend == 'sqlite':
            with sqlite3.connect(self.path) as copy, \
                    sqlite3.connect(self.url.database) as live:
                copy.backup(live)
        elif self.backend == 'postgresql':
            self._run(self._tool('pg_restore'), '--clean', '--if-exists', '-h',
                      self.url.host or '127.0.0.1', '-U', self.url.username or 'postgres',
                      '-d', self.url.database, str(self.path))
        else:
            with self.path.open('rb') as dump:
                self._run(self._tool('mysql'), '-h', self.url.host or '127.0.0.1',
                          f'-u{self.url.username or "root"}', self.url.database, stdin=dump)


def contents(side: Side) -> dict[str, tuple]:
    return {title: (post['body'],) for title, post in posts_by_title(side).items()}


def converged(central: Central, facade: Server) -> dict[str, tuple]:
    at_central, at_facade = contents(central.side), contents(facade.side)
    assert at_central == at_facade
    for side in (central.side, facade.side):  # no record twice
        assert side.count('posts') == len(at_central)
    return at_central


def history(central: Central, facade: Server) -> dict[str, int]:
    """Before the backup: records made on both sides and exchanged."""
    ids = {'c1': central_post(central, title='c1', body='c1'),
           'c2': central_post(central, title='c2', body='c2')}
    ids['f1'] = facade.create_post(title='f1', body='f1')['id']
    ids['f2'] = facade.create_post(title='f2', body='f2')['id']
    central.sync()
    central.sync()
    converged(central, facade)
    return ids


def edit(central: Central, post_id: int, body: str) -> None:
    execute(central.side, 'UPDATE posts SET body = :body WHERE id = :id', body=body, id=post_id)
    from pyramid_communicator import publish
    from pyramid_communicator.demo.models import Post
    with central.side.session() as session:
        publish(session, session.get(Post, post_id))


def test_a_restored_facade_gets_what_it_lost_and_its_new_records_reach_central(
        pair, tmp_path):
    central, facade = pair
    ids = history(central, facade)
    backup = Backup(facade.side, tmp_path)
    # After the backup: central's records and edits reach the facade; the
    # restore loses them there.
    ids['c3'] = central_post(central, title='c3', body='c3')
    edit(central, ids['c1'], 'c1 edited before the restore')
    # ... and the facade's edit reaches central: its message id, lost with
    # the restore, is handed out again there.
    facade.update_post(ids['f1'], title='f1', body='f1 edited before the restore')
    central.sync()
    assert contents(facade.side)['c3'] == ('c3',)
    assert contents(central.side)['f1'] == ('f1 edited before the restore',)
    backup.restore()
    assert 'c3' not in contents(facade.side)
    facade.update_post(ids['f1'], title='f1', body='f1 edited again on the restored facade')

    # After the restore, both sides make and edit records.
    facade.create_post(title='f4', body='made on the restored facade')
    facade.update_post(ids['f2'], title='f2', body='f2 edited on the restored facade')
    ids['c4'] = central_post(central, title='c4', body='c4')
    edit(central, ids['c2'], 'c2 edited after the restore')

    result = central.pcommunicate()
    assert result.returncode == 0, result.stderr
    central.sync()
    records = converged(central, facade)
    assert 'restored from a backup' in result.stderr and 'facade restored' in result.stderr
    assert records == {'c1': ('c1 edited before the restore',),
                       'c2': ('c2 edited after the restore',), 'c3': ('c3',), 'c4': ('c4',),
                       'f1': ('f1 edited again on the restored facade',),
                       'f2': ('f2 edited on the restored facade',),
                       'f4': ('made on the restored facade',)}
    status = central.sync('--status')
    assert 'restore detected' in status and 'sent again' in status
    # Healed once: the next runs are quiet.
    result = central.pcommunicate()
    assert result.returncode == 0 and 'restored' not in result.stderr


def test_a_restored_central_gets_what_it_lost_and_its_new_records_reach_the_facade(
        pair, tmp_path):
    central, facade = pair
    ids = history(central, facade)
    backup = Backup(central.side, tmp_path)
    ids['f3'] = facade.create_post(title='f3', body='f3')['id']
    facade.update_post(ids['f1'], title='f1', body='f1 edited before the restore')
    edit(central, ids['c1'], 'c1 edited before the restore')  # its id is handed out again
    central.sync()
    assert contents(central.side)['f3'] == ('f3',)
    assert contents(facade.side)['c1'] == ('c1 edited before the restore',)
    backup.restore()
    assert 'f3' not in contents(central.side)
    edit(central, ids['c1'], 'c1 edited again on the restored central')

    facade.create_post(title='f4', body='f4')
    facade.update_post(ids['f2'], title='f2', body='f2 edited after the restore')
    ids['c4'] = central_post(central, title='c4', body='made on the restored central')
    edit(central, ids['c2'], 'c2 edited on the restored central')

    result = central.pcommunicate()
    assert result.returncode == 0, result.stderr
    central.sync()
    records = converged(central, facade)
    assert 'central restored' in result.stderr
    assert records == {'c1': ('c1 edited again on the restored central',),
                       'c2': ('c2 edited on the restored central',),
                       'c4': ('made on the restored central',),
                       'f1': ('f1 edited before the restore',),
                       'f2': ('f2 edited after the restore',), 'f3': ('f3',), 'f4': ('f4',)}
    result = central.pcommunicate()
    assert result.returncode == 0 and 'restored' not in result.stderr


def verified(central: Central) -> None:
    result = central.pcommunicate('--verify')
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'verify: equal' in result.stdout


def test_a_restored_central_takes_back_the_records_it_made_and_only_the_facade_kept(
        pair, tmp_path):
    """Records central made and pushed after its backup come back from the
    facade's echo, signed by central: same ids, same values, and the
    facade's edits of them made meanwhile apply after them."""
    central, facade = pair
    ids = history(central, facade)
    backup = Backup(central.side, tmp_path)
    ids['c3'] = central_post(central, title='c3', body='c3')
    ids['c4'] = central_post(central, title='c4', body='c4')
    edit(central, ids['c1'], 'c1 edited before the restore')
    central.sync()
    assert contents(facade.side)['c3'] == ('c3',)
    backup.restore()
    assert 'c3' not in contents(central.side)
    at_facade = posts_by_title(facade.side)
    facade.update_post(at_facade['c4']['id'], title='c4', body='c4 edited on the facade')

    result = central.pcommunicate()
    assert result.returncode == 0, result.stderr
    assert 'central restored' in result.stderr
    central.sync()
    records = converged(central, facade)
    assert records == {'c1': ('c1 edited before the restore',), 'c2': ('c2',),
                       'c3': ('c3',), 'c4': ('c4 edited on the facade',),
                       'f1': ('f1',), 'f2': ('f2',)}
    at_central = posts_by_title(central.side)
    assert (at_central['c3']['id'], at_central['c4']['id']) == (ids['c3'], ids['c4'])
    assert central.side.count('inbound_messages', 'refused_at IS NOT NULL') == 0
    verified(central)
    # No new record takes an id the facade holds: it is a new record there.
    fresh = central_post(central, title='c5', body='made after the healing')
    assert fresh > ids['c4']
    central.sync()
    assert converged(central, facade)['c4'] == ('c4 edited on the facade',)
    status = central.sync('--status')
    assert 'echoed back 3 of its own messages (its ids 3-5)' in status  # the facade's part
    assert 'echoes: 3 of our own messages taken back' in status and '0 refused' in status
    verified(central)


def test_a_restored_facade_takes_back_the_records_it_made_and_only_central_kept(
        pair, tmp_path):
    central, facade = pair
    ids = history(central, facade)
    backup = Backup(facade.side, tmp_path)
    ids['f3'] = facade.create_post(title='f3', body='f3')['id']
    facade.update_post(ids['f2'], title='f2', body='f2 edited before the restore')
    central.sync()
    assert contents(central.side)['f3'] == ('f3',)
    backup.restore()
    assert 'f3' not in contents(facade.side)
    edit(central, posts_by_title(central.side)['f3']['id'], 'f3 edited on central')

    result = central.pcommunicate()
    assert result.returncode == 0, result.stderr
    assert 'facade restored' in result.stderr and 'echoed back 2' in result.stderr
    central.sync()
    records = converged(central, facade)
    assert records == {'c1': ('c1',), 'c2': ('c2',), 'f1': ('f1',),
                       'f2': ('f2 edited before the restore',),
                       'f3': ('f3 edited on central',)}
    assert posts_by_title(facade.side)['f3']['id'] == ids['f3']
    status = central.sync('--status')
    assert 'echoes: 2 of our own messages taken back' in status  # the facade's part
    verified(central)
    fresh = facade.create_post(title='f4', body='made after the healing')['id']
    assert fresh > ids['f3']
    central.sync()
    assert converged(central, facade)['f3'] == ('f3 edited on central',)
    verified(central)


def test_a_restored_central_takes_back_its_edits_of_facade_records(pair, tmp_path):
    """Central's edits of the facade's records, pushed after its backup,
    are stamped by central at the facade: only central's own signature,
    echoed back, can bring them back (the trust rule refuses any other
    claim of a central edit past central's clock), and then the sides
    converge."""
    central, facade = pair
    ids = history(central, facade)
    backup = Backup(central.side, tmp_path)
    facade.create_post(title='f3', body='f3')  # made after the backup: lost too
    central.sync()
    at_central = posts_by_title(central.side)
    edit(central, at_central['f1']['id'], 'f1 edited by central before the restore')
    edit(central, at_central['f2']['id'], 'f2 edited by central before the restore')
    edit(central, at_central['f3']['id'], 'f3 edited by central before the restore')
    central.sync()
    assert contents(facade.side)['f1'] == ('f1 edited by central before the restore',)
    backup.restore()
    assert contents(central.side)['f1'] == ('f1',) and 'f3' not in contents(central.side)
    facade.update_post(ids['f2'], title='f2', body='f2 edited on the facade since')

    result = central.pcommunicate()
    assert result.returncode == 0, result.stderr
    assert 'central restored' in result.stderr
    central.sync()
    records = converged(central, facade)
    assert records['f1'] == ('f1 edited by central before the restore',)
    assert records['f2'] == ('f2 edited on the facade since',)
    assert records['f3'] == ('f3 edited by central before the restore',)
    assert central.side.count('inbound_messages', 'refused_at IS NOT NULL') == 0
    assert 'echoes: 3 of our own messages taken back' in central.sync('--status')
    verified(central)
    edit(central, posts_by_title(central.side)['f1']['id'], 'f1 edited after the healing')
    central.sync()
    assert converged(central, facade)['f1'] == ('f1 edited after the healing',)
    verified(central)


def test_a_restored_facade_takes_back_its_edits_of_central_records(
        pair, tmp_path):
    central, facade = pair
    history(central, facade)
    backup = Backup(facade.side, tmp_path)
    at_facade = posts_by_title(facade.side)
    facade.update_post(at_facade['c1']['id'], title='c1',
                       body='c1 edited by the facade before the restore')
    central.sync()
    assert contents(central.side)['c1'] == ('c1 edited by the facade before the restore',)
    backup.restore()
    assert contents(facade.side)['c1'] == ('c1',)

    result = central.pcommunicate()
    assert result.returncode == 0, result.stderr
    assert 'facade restored' in result.stderr
    central.sync()
    records = converged(central, facade)
    assert records['c1'] == ('c1 edited by the facade before the restore',)
    assert records['c2'] == ('c2',)
    assert 'echoes: 1 of our own messages taken back' in central.sync('--status')
    verified(central)


def test_a_record_made_after_the_restore_that_took_a_lost_id_is_reported(pair, tmp_path):
    """The documented limit: central restored, and a record made there
    before the healing run takes the id of one it lost (which the facade
    holds).  The echo of the lost record is refused with that reason, and
    ``--status`` says so; the sides still converge."""
    central, facade = pair
    history(central, facade)
    backup = Backup(central.side, tmp_path)
    lost = central_post(central, title='c3', body='c3')
    central.sync()
    backup.restore()
    assert central_post(central, title='c3', body='made after the restore') == lost

    result = central.pcommunicate()
    assert result.returncode == 0, result.stderr
    central.sync()
    # The new record went out first and took the lost one's place at the
    # facade too: the lost one is gone on both sides (the limit), but said.
    assert converged(central, facade)['c3'] == ('made after the restore',)
    refused = [row['last_error'] for row in central.side.rows('inbound_messages')
               if row['refused_at'] is not None]
    assert len(refused) == 1 and 'a record made here since took' in refused[0]
    assert 'of our lost records not taken back: a record made here after the restore' \
        in central.sync('--status')


def test_a_restored_facade_takes_back_its_delete_of_a_central_record(pair, tmp_path):
    """The facade deletes a tag of central's and the delete reaches
    central; the facade's restore brings the tag back there.  The echo of
    its own signed delete removes it again: gone on both sides."""
    central, facade = pair
    with central.side.session() as session:  # autopublished
        session.add_all([Tag(name='kept', label='k'), Tag(name='doomed', label='d')])
    central.sync()
    tags = {tag['name']: tag['id'] for tag in
            requests.get(facade.url + '/tags', timeout=10).json()['tags']}
    assert set(tags) == {'kept', 'doomed'}
    backup = Backup(facade.side, tmp_path)
    requests.delete(f"{facade.url}/tags/{tags['doomed']}", timeout=10).raise_for_status()
    central.sync()
    assert [row['name'] for row in central.side.rows('tags')] == ['kept']
    backup.restore()
    assert facade.side.count('tags') == 2

    result = central.pcommunicate()
    assert result.returncode == 0, result.stderr
    assert 'facade restored' in result.stderr
    central.sync()
    for side in (central.side, facade.side):
        assert [row['name'] for row in side.rows('tags')] == ['kept']
    verified(central)
