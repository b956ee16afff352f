"""``python -m pyramid_communicator.demo``: the main job, end to end.

Serves the facade (facade.ini) with waitress on 127.0.0.1:6544, makes
records on both sides, runs ``pcommunicate development.ini`` and shows
what each side holds afterwards.  Run it from the directory holding the
two ini files.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

from pyramid.paster import bootstrap

CENTRAL_INI = 'development.ini'
FACADE_INI = 'facade.ini'
FACADE_URL = 'http://127.0.0.1:6544'


def _bin(name: str) -> str:
    here = os.path.dirname(sys.executable)
    path = os.path.join(here, name)
    return path if os.path.exists(path) else (shutil.which(name) or name)


def facade(method: str, path: str, data: dict | None = None) -> dict:
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(FACADE_URL + path, data=body, method=method,
                                     headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def wait_for_facade(server: subprocess.Popen) -> None:
    for _ in range(100):  # 20 seconds at most
        if server.poll() is not None:
            raise SystemExit('the facade server exited; is port 6544 taken?')
        try:
            facade('GET', '/posts')
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit('the facade did not start within 20 seconds')


def central_records() -> dict:
    from .models import Comment, Note, Post
    with bootstrap(CENTRAL_INI) as env:
        request = env['request']
        with request.tm:
            return {
                'posts': [{'id': p.id, 'title': p.title, 'body': p.body, 'slug': p.slug,
                           'tags': [t.name for t in p.tags]}
                          for p in request.dbsession.query(Post).order_by(Post.id)],
                'comments': [{'id': c.id, 'post_id': c.post_id, 'title': c.title,
                              'body': c.body}
                             for c in request.dbsession.query(Comment).order_by(Comment.id)],
                'notes': [{'id': str(n.id), 'title': n.title, 'body': n.body}
                          for n in request.dbsession.query(Note).order_by(Note.id)],
            }


def facade_records() -> dict:
    return {**facade('GET', '/posts'), **facade('GET', '/notes')}


def central_write(change) -> None:
    with bootstrap(CENTRAL_INI) as env:
        request = env['request']
        with request.tm:
            change(request.dbsession)


def show(title: str, records: dict) -> None:
    print(f'  {title}:')
    for post in records['posts']:
        print(f"    post {post['id']}: {post['title']!r} / {post['body']!r}"
              f" tags={post['tags']}")
    for comment in records['comments']:
        print(f"    comment {comment['id']} on post {comment['post_id']}: "
              f"title={comment['title']!r} body={comment['body']!r}")
    for note in records['notes']:
        print(f"    note {note['id']}: {note['title']!r} / {note['body']!r}")


def pcommunicate() -> None:
    print(f'$ pcommunicate {CENTRAL_INI}')
    result = subprocess.run([_bin('pcommunicate'), CENTRAL_INI], text=True,
                            capture_output=True, timeout=120)
    print('  ' + (result.stdout + result.stderr).strip().replace('\n', '\n  '))
    if result.returncode != 0:
        raise SystemExit(f'pcommunicate failed with status {result.returncode}')


def main() -> int:
    for ini in (CENTRAL_INI, FACADE_INI):
        if not os.path.exists(ini):
            raise SystemExit(f'{ini} not found: run this from the repository root')
    for name in ('central.sqlite', 'facade.sqlite'):
        for suffix in ('', '-wal', '-shm', '.communicator-lock'):
            if os.path.exists(name + suffix):
                os.remove(name + suffix)
    print(f'1. serving the facade: pserve {FACADE_INI} ({FACADE_URL})')
    server = subprocess.Popen([_bin('pserve'), FACADE_INI],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_facade(server)
        from pyramid_communicator import publish

        from .models import Comment, Post, Tag

        print('2. central creates a post tagged "news" and a comment; the facade creates '
              'a post and a note (a UUID key)')

        def central_post(session):
            post = Post(title='Hello from central', body='written in the private network')
            post.tags.append(Tag(name='news'))
            session.add(post)
            session.flush()
            publish(session, post)  # with its tags
            session.add(Comment(post_id=post.id, title='private note', body='Nice!'))

        central_write(central_post)
        facade('POST', '/posts', {'title': 'Hello from the facade', 'body': 'written online'})
        facade('POST', '/notes', {'title': 'Remember', 'body': 'same id on both sides'})
        show('central before', central_records())
        show('facade before', facade_records())

        print('3. central syncs both ways')
        pcommunicate()
        show('central', central_records())
        show('facade', facade_records())

        print("4. the facade edits central's post and tags it \"online\" too; "
              'central syncs again')
        facade('POST', '/tags', {'name': 'online'})
        facade_post = next(p for p in facade('GET', '/posts')['posts']
                           if p['title'] == 'Hello from central')
        facade('POST', f"/posts/{facade_post['id']}",
               {'body': 'edited on the facade', 'tags': facade_post['tags'] + ['online']})
        pcommunicate()
        central = central_records()
        facade_now = facade_records()
        show('central', central)
        show('facade', facade_now)

        def shared(records: dict) -> tuple:
            return (sorted((p['title'], p['body'], p['tags']) for p in records['posts']),
                    sorted((n['id'], n['title'], n['body']) for n in records['notes']))
        same = shared(central) == shared(facade_now)
        print('5. both sides hold the same posts, tags and notes:', 'yes' if same else 'NO')
        return 0 if same else 1
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == '__main__':
    sys.exit(main())
