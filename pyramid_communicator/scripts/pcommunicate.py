"""``pcommunicate CONFIG_URI``: push, pull and apply, for cron or a timer.

Exit status: 0 on success (also when another run holds the lock and this
one therefore did nothing), 1 when the exchange failed, when ``--status``
could not ask the peer, or when ``--drain`` did not drain; 2 for a bad
command line or configuration; 3 when ``--verify`` found differences, or
``--repair`` left some.
"""
from __future__ import annotations

import argparse
import gc
import getpass
import json
import logging
import sys
import textwrap
from collections.abc import Sequence

import transaction
from pyramid.exceptions import ConfigurationError
from pyramid.paster import bootstrap, setup_logging
from sqlalchemy.orm import Session
from zope.sqlalchemy import register

from .. import outbound_failures
from ..client import Client, PeerError
from ..drain import Drain
from ..locking import run_lock
from ..printable import printable
from ..progress import Progress, Totals
from ..queues import set_state
from ..records import UnknownRecord, receiver_for
from ..retention import purge
from ..retries import Backoff
from ..seeding import publish_all
from ..settings import get_settings, require_base_uri
from ..status import FAILED as PEER_UNREACHABLE
from ..status import (
    format_peer_status,
    format_status,
    give_up,
    peer_status,
    queue_status,
    revive,
)
from ..sync import Communicator, apply_inbound, make_session

log = logging.getLogger(__name__)

OK, FAILED, USAGE, DIFFERENT = 0, 1, 2, 3
#: Seconds ``--drain`` goes on by default.
DRAIN_TIMEOUT = 300.0


class PCommunicateCommand:
    description = textwrap.dedent("""\
        Synchronise this app with its peer: push the outbound queue, pull
        the peer's, apply what arrived. Meant for cron or a systemd timer.
        """)

    def __init__(self, argv: Sequence[str], quiet: bool = False,
                 out=None, err=None, own_process: bool = False) -> None:
        #: Run as the console script, in a process of its own: its garbage
        #: collector may be tuned (never a caller's, such as a test run's).
        self.own_process = own_process
        self.args = self.parser().parse_args(list(argv[1:]))
        self.quiet = quiet or self.args.quiet
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.progress = Progress.on_terminal(self.err, self.quiet)

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog='pcommunicate', description=cls.description)
        parser.add_argument('config_uri', help='the app ini file, e.g. production.ini')
        action = parser.add_mutually_exclusive_group()
        action.add_argument('--push', action='store_true', help='push only')
        action.add_argument('--pull', action='store_true', help='pull (and apply) only')
        action.add_argument('--status', action='store_true',
                            help='print queue depths, ages, failures and last exchanges, '
                                 "of this app and (with base_uri) of the peer")
        action.add_argument('--drain', action='store_true',
                            help='exchange until both sides have nothing pending and '
                                 'nothing failed (before an upgrade); exit 1 naming what '
                                 'is left if that does not happen within --timeout')
        action.add_argument('--retry', nargs='*', type=int, metavar='ID',
                            help='apply failed inbound messages now (all, or these '
                                 'ids); given-up messages named here are revived')
        action.add_argument('--give-up', nargs='+', type=int, metavar='ID',
                            help='stop retrying these inbound messages (needs --reason)')
        action.add_argument('--retry-outbound', nargs='*', type=int, metavar='ID',
                            help='send set-aside outbound messages again with the next '
                                 'push (all, or these ids; given-up ones named here are '
                                 'revived)')
        action.add_argument('--give-up-outbound', nargs='+', type=int, metavar='ID',
                            help='never send these set-aside outbound messages; the later '
                                 'messages of their records go (needs --reason)')
        action.add_argument('--purge', action='store_true',
                            help='delete delivered and applied messages (and conflict '
                                 'records) older than communicator.retention_days now')
        action.add_argument('--publish-all', nargs='+', metavar='NAME',
                            help='publish every existing record of these models (their '
                                 'receives_from names); resumes after an interruption')
        action.add_argument('--verify', nargs='*', metavar='NAME',
                            help='compare the synced records of these models (default: '
                                 'all) with the peer\'s; exit 3 listing the differences')
        action.add_argument('--repair', nargs='*', metavar='NAME',
                            help='make these models (default: all) equal on both sides: '
                                 'the side that must win re-publishes, then a sync; exit 3 '
                                 'if differences are left')
        parser.add_argument('--prefer', metavar='APP',
                            help='with --repair: the app whose values win where both '
                                 'hold the same version (default: this app)')
        parser.add_argument('--timeout', type=float, metavar='SECONDS',
                            help=f'with --drain: give up after this long '
                                 f'(default {DRAIN_TIMEOUT:g})')
        parser.add_argument('--quiet', action='store_true',
                            help='no progress and no summary line; errors still go to '
                                 'stderr')
        parser.add_argument('--json', action='store_true',
                            help='with --status, --verify or --repair: JSON output')
        parser.add_argument('--reason', help='with --give-up(-outbound): why (recorded)')
        parser.add_argument('--by', default=None,
                            help='with --give-up(-outbound): who (recorded; default: '
                                 'login name)')
        parser.add_argument('--older-than', type=float, metavar='DAYS',
                            help='with --purge: instead of communicator.retention_days')
        return parser

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.out)

    def fail(self, text: str, code: int = FAILED) -> int:
        # One line, nothing a terminal acts on, whatever a peer put in it.
        print(f'pcommunicate: {printable(text, 2000)}', file=self.err)
        return code

    def run(self) -> int:
        args = self.args
        if args.give_up and not args.reason:
            return self.fail('--give-up needs --reason', USAGE)
        if args.give_up_outbound and not args.reason:
            return self.fail('--give-up-outbound needs --reason', USAGE)
        if args.older_than is not None and (not args.purge or args.older_than < 0):
            return self.fail('--older-than DAYS (0 or more) goes with --purge', USAGE)
        if args.timeout is not None and (not args.drain or args.timeout < 0):
            return self.fail('--timeout SECONDS (0 or more) goes with --drain', USAGE)
        if args.prefer is not None and args.repair is None:
            return self.fail('--prefer APP goes with --repair', USAGE)
        try:
            setup_logging(args.config_uri)
            env = bootstrap(args.config_uri)
        except ConfigurationError as exc:
            return self.fail(str(exc).splitlines()[0], USAGE)
        except Exception as exc:
            detail = (str(exc).strip().splitlines() or [''])[0]
            return self.fail(f'cannot load {args.config_uri}: {type(exc).__name__}: {detail}',
                             USAGE)
        if self.own_process:
            tune_garbage_collector()
        with env:
            try:
                settings = get_settings(env['registry'])
                # The app's registry: the handlers of plain messages.
                self.registry = env['registry']
                bind = getattr(env['request'], settings.dbsession).get_bind()
            except (ConfigurationError, AttributeError) as exc:
                return self.fail(str(exc).splitlines()[0], USAGE)
            if args.status:
                return self.status(settings, bind)
            if args.give_up:
                return self.give_up(settings, bind)
            if args.retry is not None:
                return self.retry(settings, bind)
            if args.give_up_outbound:
                return self.give_up_outbound(bind)
            if args.retry_outbound is not None:
                return self.retry_outbound(bind)
            if args.purge:
                return self.purge(settings, bind)
            if args.publish_all:
                return self.publish_all(settings, bind)
            try:
                require_base_uri(settings)
            except ConfigurationError as exc:
                return self.fail(str(exc), USAGE)
            if args.drain:
                return self.drain(settings, bind)
            if args.verify is not None or args.repair is not None:
                return self.verify(settings, bind)
            return self.communicate(settings, bind)

    def communicate(self, settings, bind) -> int:
        with run_lock(bind, settings.name, settings.lock_wait) as acquired:
            if not acquired:
                self.say('another pcommunicate run holds the lock; nothing to do')
                return OK
            communicator = Communicator(settings, bind, progress=self.progress,
                                        registry=self.registry)
            try:
                summary = communicator.communicate(push=not self.args.pull,
                                                   pull=not self.args.push)
            except PeerError as exc:
                return self.fail(str(exc))
            finally:
                communicator.close()
        self.say(str(summary))
        return OK

    def _names(self) -> list[str] | None:
        from ..verify import all_names
        names = self.args.verify if self.args.verify is not None else self.args.repair
        for name in names:
            receiver_for(name)  # UnknownRecord for a name no model receives
        return list(dict.fromkeys(names)) or all_names()

    def verify(self, settings, bind) -> int:
        """``--verify`` and ``--repair``: the descent of :mod:`..verify`,
        and for a repair the re-publishing and sync of :mod:`..repair`,
        logged and kept for ``--status`` (``last_verify``,
        ``last_repair``)."""
        from ..repair import repair
        from ..verify import Verifier, format_report
        try:
            names = self._names()
        except UnknownRecord as exc:
            return self.fail(str(exc), USAGE)
        prefer = self.args.prefer or settings.name
        client = Client(settings)
        try:
            if self.args.repair is None:
                report = Verifier(bind, settings.name, client).run(names)
                self._remember(bind, 'last_verify', report.summary())
                self._print_report(report, format_report)
                return DIFFERENT if report.differences else OK
            with run_lock(bind, settings.name, settings.lock_wait) as acquired:
                if not acquired:
                    return self.fail('another pcommunicate run holds the lock; '
                                     'repair not started')
                result = repair(bind, settings, client, names, prefer,
                                registry=self.registry)
        except PeerError as exc:
            return self.fail(str(exc))
        except ValueError as exc:  # a bad --prefer
            return self.fail(str(exc), USAGE)
        finally:
            client.close()
        self._remember(bind, 'last_repair', result.summary())
        self._remember(bind, 'last_verify', result.after.summary())
        if self.args.json:
            data = {'repair': {'found': len(result.before.differences),
                               'republished_here': result.local,
                               'republished_by_peer': result.peer,
                               'relinked_here': result.links_local,
                               'relinked_by_peer': result.links_peer,
                               'left_as_is': [{**d.as_json(result.before.local_name,
                                                           result.before.peer_name),
                                               'reason': why} for d, why in result.plan.left],
                               'sync': str(result.sync) if result.sync else None,
                               'before': result.before.as_json()},
                    **result.after.as_json()}
            self.say(json.dumps(data, indent=2, ensure_ascii=True))
        else:
            for difference, why in result.plan.left:
                self.say(printable(f'left as is: {difference.name} '
                                   f'{list(difference.identity)}: {why}', 2000))
            self.say(f'repair: {result.summary()}')
            self.say(format_report(result.after))
        return DIFFERENT if result.after.differences else OK

    def _print_report(self, report, format_report) -> None:
        if self.args.json:
            self.say(json.dumps(report.as_json(), indent=2, ensure_ascii=True))
        else:
            self.say(format_report(report))

    def _remember(self, bind, key: str, value: str) -> None:
        tm, session = self._unit_of_work(bind)
        with tm:
            set_state(session, key, value[:255])
        session.close()

    def _unit_of_work(self, bind):
        tm = transaction.TransactionManager(explicit=True)
        return tm, make_session(bind, tm)

    def drain(self, settings, bind) -> int:
        timeout = DRAIN_TIMEOUT if self.args.timeout is None else self.args.timeout
        result = Drain(settings, bind, timeout, self.progress, registry=self.registry).run()
        if not result.drained:
            return self.fail(f'not drained: {result}')
        self.say(f'drained: nothing pending and nothing failed on either side '
                 f'(exchanges={result.rounds} pushed={result.summary.pushed} '
                 f'pulled={result.summary.pulled} applied={result.summary.applied})')
        return OK

    def status(self, settings, bind) -> int:
        """This app's status, then (with a base_uri: central) the peer's,
        asked over HTTP once the local transaction is over."""
        tm, session = self._unit_of_work(bind)
        with tm:
            report = queue_status(session, settings.name, backoff=Backoff.of(settings))
        session.close()
        peer = None
        if settings.base_uri:
            client = Client(settings)
            try:
                peer = peer_status(client)
            finally:
                client.close()
        if self.args.json:
            if peer is not None:
                report['peer'] = peer.as_json()
            # ASCII: the peer's strings arrive with every control, bidi and
            # other non-ASCII character as a \u escape, never raw.
            self.say(json.dumps(report, indent=2, ensure_ascii=True))
        else:
            text = format_status(report)
            if peer is not None:
                text += '\n\n' + format_peer_status(peer)
            self.say(text)
        if peer is not None and peer.state == PEER_UNREACHABLE:
            return self.fail(f'peer status: {peer.error}')
        return OK

    def give_up(self, settings, bind) -> int:
        tm, session = self._unit_of_work(bind)
        by = self.args.by or getpass.getuser()
        with tm:
            count = give_up(session, self.args.give_up, by, self.args.reason)
        self.say(f'gave up on {count} inbound message(s)')
        missed = len(set(self.args.give_up)) - count
        if missed:
            return self.fail(f'{missed} of the ids named are not pending inbound messages '
                             '(unknown, already applied or already given up)')
        return OK

    def retry(self, settings, bind) -> int:
        ids = self.args.retry or None
        tm, session = self._unit_of_work(bind)
        if ids:
            with tm:
                revive(session, ids)
        result = apply_inbound(bind, settings, ids, retry_now=True,
                               registry=self.registry)
        self.say(f'applied={result.applied} failed={result.failed} waiting={result.waiting}')
        if result.failed:
            return self.fail(f'{result.failed} inbound message(s) still fail; '
                             'see pcommunicate --status for their errors')
        return OK

    def give_up_outbound(self, bind) -> int:
        """Settle set-aside outbound messages for good: never sent."""
        tm, session = self._unit_of_work(bind)
        ids = self.args.give_up_outbound
        with tm:
            count = outbound_failures.give_up(session, ids, self.args.by or getpass.getuser(),
                                              self.args.reason)
        session.close()
        self.say(f'gave up on {count} outbound message(s)')
        missed = len(set(ids)) - count
        if missed:
            return self.fail(f'{missed} of the ids named are not set-aside outbound messages '
                             '(unknown, pending, delivered or already given up)')
        return OK

    def retry_outbound(self, bind) -> int:
        """Let set-aside outbound messages go again.  Only the local queue
        changes (the peer need not be up): the next push sends them."""
        tm, session = self._unit_of_work(bind)
        ids = self.args.retry_outbound or None
        with tm:
            count = outbound_failures.retry(session, ids)
        session.close()
        self.say(f'{count} outbound message(s) go again with the next push')
        missed = len(set(ids)) - count if ids else 0
        if missed:
            return self.fail(f'{missed} of the ids named are not set-aside or given-up '
                             'outbound messages (unknown, pending or delivered)')
        return OK

    def purge(self, settings, bind) -> int:
        tm, session = self._unit_of_work(bind)
        days = self.args.older_than
        if days is None:
            days = settings.retention_days
        self.say(str(purge(session, tm, days)))
        return OK

    def publish_all(self, settings, bind) -> int:
        tm = transaction.TransactionManager(explicit=True)
        session = Session(bind=bind)  # a host session: what it publishes is ours
        register(session, transaction_manager=tm)
        for name in self.args.publish_all:
            try:
                receiver_for(name)
            except UnknownRecord as exc:
                return self.fail(str(exc), USAGE)
        for name in self.args.publish_all:
            progress = Totals(self.progress)
            try:
                count = publish_all(session, tm, name, settings.batch_size, progress)
            finally:
                progress.close()
            self.say(f'published {count} {name} record(s)')
        return OK


def tune_garbage_collector() -> None:
    """For a process that loaded the app and now applies batches.

    The objects made while loading the app live as long as the process:
    frozen, full collections stop walking them.  A batch makes thousands of
    ORM objects, most freed by reference counting; the default first
    generation (700 allocations) makes the collector walk them again and
    again.  Together these take about a fifth off applying a batch
    (``benchmarks``: 125 to 98 µs per record on SQLite).  The cyclic
    garbage still goes, a little later.
    """
    gc.freeze()
    first, second, third = gc.get_threshold()
    gc.set_threshold(max(first, 10_000), second, third)


def main(argv: Sequence[str] = sys.argv, quiet: bool = False) -> int:
    return PCommunicateCommand(argv, quiet).run()


def console() -> int:
    """The ``pcommunicate`` console script: :func:`main` in a process of its
    own."""
    return PCommunicateCommand(sys.argv, own_process=True).run()


if __name__ == '__main__':  # pragma: no cover
    sys.exit(console())
