"""Failed logins on the server: a guessing address gets 429s with
``Retry-After`` instead of an answer to its guess, the log a line per
address and window, and central, from its own address, still gets in."""
from __future__ import annotations

import logging
import threading

import pytest
from test_views import DELIVERED, MESSAGES, array, basic, get_messages, message, post_json
from webtest import TestApp

from pyramid_communicator.throttle import LoginThrottle

WRONG = basic(password='not-the-password')
ATTACKER = {'REMOTE_ADDR': '203.0.113.9'}
CENTRAL = {'REMOTE_ADDR': '198.51.100.7'}


def get(app: TestApp, headers: dict[str, str], environ: dict[str, str]):
    return app.get(f'{MESSAGES}?from_id=0&pending=1',
                   headers={'Accept': 'application/json', **headers},
                   extra_environ=environ, expect_errors=True)


def throttle_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == 'pyramid_communicator.throttle' and r.levelno >= logging.WARNING]


@pytest.fixture
def app(webapp, make_side) -> TestApp:
    return webapp(make_side('facade'), **{'communicator.login_attempts': 5,
                                          'communicator.login_window': 60})


def test_wrong_passwords_are_throttled_with_retry_after(app, caplog) -> None:
    caplog.set_level(logging.INFO)
    statuses = [get(app, WRONG, ATTACKER).status_int for _ in range(50)]
    assert statuses == [401] * 5 + [429] * 45
    throttled = get(app, WRONG, ATTACKER)
    assert throttled.status_int == 429
    assert 0 < int(throttled.headers['Retry-After']) <= 60
    assert 'too many failed logins' in throttled.json['error']
    # 55 wrong passwords: two lines, when the window started and when
    # throttling did; none per attempt.
    lines = throttle_lines(caplog)
    assert len(lines) == 2
    assert all('203.0.113.9' in line for line in lines)
    assert 'answering 429' in lines[1]


def test_a_throttled_address_is_not_told_when_it_guessed_right(app) -> None:
    for _ in range(5):
        get(app, WRONG, ATTACKER)
    assert get(app, basic(), ATTACKER).status_int == 429  # no oracle


def test_the_right_credentials_from_another_address_still_work(app) -> None:
    for _ in range(20):
        get(app, WRONG, ATTACKER)
    assert get(app, basic(), CENTRAL).status_int == 200
    assert post_json(app, array(message(1)), headers=basic(),
                     extra_environ=CENTRAL).status_int == 202
    assert post_json(app, '{"ids": []}', url=DELIVERED, headers=basic(),
                     extra_environ=CENTRAL).status_int == 200
    # Every route of the attacker's is throttled alike.
    assert post_json(app, array(message(2)), headers=basic(),
                     extra_environ=ATTACKER).status_int == 429
    assert get_messages(app, 'from_id=0').status_int == 200  # WebTest's own address


def test_login_attempts_zero_never_throttles_but_logs_once_per_window(
        webapp, make_side, caplog) -> None:
    caplog.set_level(logging.INFO)
    app = webapp(make_side('facade'), **{'communicator.login_attempts': 0})
    assert {get(app, WRONG, ATTACKER).status_int for _ in range(30)} == {401}
    assert len(throttle_lines(caplog)) == 1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_window_ends_and_the_address_may_try_again() -> None:
    clock = Clock()
    guard = LoginThrottle(attempts=3, window=60, clock=clock)
    for _ in range(3):
        assert guard.retry_after('a') is None
        guard.failed('a')
    assert guard.retry_after('a') == 60
    clock.now += 59.5
    assert guard.retry_after('a') == 1
    clock.now += 0.5
    assert guard.retry_after('a') is None
    guard.failed('a')  # a new window, counted from one
    assert guard.retry_after('a') is None


def test_one_log_line_per_address_and_window(caplog) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    guard = LoginThrottle(attempts=10, window=60, clock=clock)
    for _ in range(3000):
        guard.failed('a')
    assert len(throttle_lines(caplog)) == 2  # window start, throttling start
    clock.now += 60
    guard.failed('a')
    assert len(throttle_lines(caplog)) == 3


def test_the_table_of_addresses_is_bounded_oldest_first() -> None:
    clock = Clock()
    guard = LoginThrottle(attempts=1, window=60, capacity=100, clock=clock)
    for number in range(250):
        clock.now += 0.01
        guard.failed(f'10.0.{number // 256}.{number % 256}')
    assert len(guard) == 100
    assert guard.retry_after('10.0.0.0') is None  # forgotten
    assert guard.retry_after('10.0.0.249') is not None


def test_counting_is_thread_safe() -> None:
    guard = LoginThrottle(attempts=4000, window=60)

    def fail() -> None:
        for _ in range(500):
            guard.failed('a')
    threads = [threading.Thread(target=fail) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert guard.retry_after('a') is not None  # exactly 4000 counted
