"""The ``communicator.*`` settings as a user meets them: at
``config.include('pyramid_communicator')`` time and when ``pcommunicate``
starts, a missing or malformed value is one clear line naming the key.
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import BIN, PASSWORD, USERNAME
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError

from pyramid_communicator import get_settings
from pyramid_communicator.settings import CommunicatorSettings, parse_settings

BASE = {
    'communicator.name': 'facade',
    'communicator.username': USERNAME,
    'communicator.password': PASSWORD,
}


def include(**overrides: Any) -> CommunicatorSettings:
    """Include the add-on the way a host app does and return what it parsed;
    a value of None removes the key (as if the ini lacked it)."""
    settings = {**BASE, **overrides}
    settings = {key: value for key, value in settings.items() if value is not None}
    config = Configurator(settings=settings)
    config.include('pyramid_communicator')
    return get_settings(config.registry)


def include_error(**overrides: Any) -> str:
    """The message of the ConfigurationError that including raises."""
    with pytest.raises(ConfigurationError) as info:
        include(**overrides)
    return str(info.value)


# -- required keys -------------------------------------------------------------

@pytest.mark.parametrize('key', ['communicator.name', 'communicator.username',
                                 'communicator.password'])
@pytest.mark.parametrize('value', [None, '', '   '], ids=['absent', 'empty', 'blank'])
def test_required_key_missing_fails_at_include_naming_it(key: str, value: str | None) -> None:
    message = include_error(**{key: value})
    assert key in message
    assert '\n' not in message


def test_minimal_settings_give_the_documented_defaults() -> None:
    settings = include()
    assert settings.name == 'facade'
    assert settings.username == USERNAME
    assert settings.password == PASSWORD
    assert settings.base_uri is None  # optional on a side that only serves
    assert settings.batch_size == 200
    assert settings.timeout == 10.0
    assert settings.max_body_bytes == 10 * 1024 * 1024
    assert settings.verify is True
    assert settings.dbsession == 'dbsession'
    assert settings.apply_on_receive is True
    assert settings.lock_wait == 0
    assert settings.login_attempts == 10
    assert settings.login_window == 60
    assert settings.run_seconds == 300
    assert settings.apply_seconds == 3.0


def test_parse_settings_without_pyramid_gives_the_same_result_as_include() -> None:
    assert parse_settings(BASE) == include()


# -- malformed values ------------------------------------------------------------

@pytest.mark.parametrize('key, value', [
    ('communicator.batch_size', 'abc'),
    ('communicator.batch_size', '0'),
    ('communicator.batch_size', '-5'),
    ('communicator.batch_size', '2.5'),
    ('communicator.timeout', '-1'),
    ('communicator.timeout', '0'),
    ('communicator.timeout', 'soon'),
    ('communicator.timeout', 'nan'),
    ('communicator.max_body_bytes', '0'),
    ('communicator.max_body_bytes', 'ten megabytes'),
    ('communicator.lock_wait', '-1'),
    ('communicator.login_attempts', '-1'),
    ('communicator.login_window', '0'),
    ('communicator.run_seconds', '-1'),
    ('communicator.run_seconds', '1.5'),
    ('communicator.apply_seconds', '-1'),
    ('communicator.apply_seconds', 'nan'),
    ('communicator.apply_seconds', 'inf'),
    ('communicator.base_uri', 'ftp://x'),
    ('communicator.base_uri', 'facade.example.com'),
    ('communicator.base_uri', 'http://'),
    ('communicator.name', 'my app'),
    ('communicator.name', 'central/1'),
    ('communicator.name', 'x' * 65),
    ('communicator.dbsession', 'db session'),
    ('communicator.dbsession', 'db-session'),  # no request attribute can be named so
    ('communicator.dbsession', 'db.session'),
    ('communicator.apply_on_receive', 'ture'),  # a typo must not turn applying off
])
def test_malformed_value_fails_at_include_naming_the_key(key: str, value: str) -> None:
    message = include_error(**{key: value})
    assert key in message
    assert '\n' not in message


@pytest.mark.parametrize('key, value', [
    ('communicator.batch_size', 0),
    ('communicator.batch_size', -3),
    ('communicator.timeout', -1),
    ('communicator.max_body_bytes', 0),
])
def test_malformed_non_string_value_from_python_fails_too(key: str, value: int) -> None:
    """Apps configured from Python (tests, factories) pass ints, not ini
    strings; they must be checked just the same."""
    message = include_error(**{key: value})
    assert key in message


@pytest.mark.parametrize('key, value, expected', [
    ('communicator.batch_size', '5', 5),
    ('communicator.batch_size', ' 7 ', 7),
    ('communicator.batch_size', 9, 9),
    ('communicator.timeout', '2.5', 2.5),
    ('communicator.timeout', '3', 3.0),
    ('communicator.max_body_bytes', '1024', 1024),
    ('communicator.lock_wait', '30', 30),
    ('communicator.run_seconds', '0', 0),
    ('communicator.apply_seconds', '0', 0.0),
    ('communicator.apply_seconds', '0.5', 0.5),
    ('communicator.base_uri', 'https://facade.example.com/sync/', 'https://facade.example.com/sync'),
    ('communicator.base_uri', 'http://127.0.0.1:6544', 'http://127.0.0.1:6544'),
    ('communicator.name', 'facade-2.eu_west', 'facade-2.eu_west'),
    ('communicator.verify', 'false', False),
    ('communicator.verify', 'true', True),
    ('communicator.verify', False, False),
    ('communicator.verify', '/etc/ssl/private-ca.pem', '/etc/ssl/private-ca.pem'),
    ('communicator.apply_on_receive', 'false', False),
    ('communicator.dbsession', 'db', 'db'),
    ('communicator.login_attempts', '0', 0),
    ('communicator.login_window', '300', 300),
])
def test_well_formed_value_is_accepted_as_documented(key: str, value: Any, expected: Any) -> None:
    settings = include(**{key: value})
    assert getattr(settings, key.removeprefix('communicator.')) == expected


def test_password_keeps_its_inner_characters() -> None:
    """Only surrounding whitespace goes (as in any ini value); colons and
    spaces inside a password are part of it."""
    assert include(**{'communicator.password': ' p:w d '}).password == 'p:w d'


# -- no password in reprs ----------------------------------------------------------

def test_settings_repr_never_shows_the_password() -> None:
    settings = include(**{'communicator.password': 'hunter2-very-secret'})
    for shown in (repr(settings), str(settings), f'{settings!r}', repr([settings])):
        assert 'hunter2-very-secret' not in shown
    assert 'facade' in repr(settings)  # still useful in a log line


def test_error_for_a_malformed_value_never_shows_the_password() -> None:
    message = include_error(**{'communicator.password': 'hunter2-very-secret',
                               'communicator.batch_size': 'abc'})
    assert 'hunter2-very-secret' not in message


# -- pcommunicate start-up -------------------------------------------------------------

def assert_one_clear_line(result: subprocess.CompletedProcess, *words: str) -> None:
    """Exit status 2 (configuration), one line on stderr naming ``words``,
    no traceback, nothing on stdout that looks like a summary."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert 'Traceback' not in result.stderr
    for word in words:
        assert word in lines[0]
    assert 'pushed=' not in result.stdout


@pytest.mark.parametrize('args', [(), ('--push',), ('--pull',)],
                         ids=['both', 'push', 'pull'])
def test_pcommunicate_without_base_uri_exits_2_naming_it(make_side, make_central,
                                                         args: tuple[str, ...]) -> None:
    central = make_central(make_side('central'), None)
    assert_one_clear_line(central.pcommunicate(*args), 'communicator.base_uri')


def test_pcommunicate_status_works_without_base_uri(make_side, make_central) -> None:
    """A side that only serves has no base_uri; its operator still gets
    the queue status."""
    central = make_central(make_side('central'), None)
    result = central.pcommunicate('--status')
    assert result.returncode == 0, result.stderr


def test_pcommunicate_with_missing_ini_exits_2_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / 'nowhere' / 'central.ini'
    result = subprocess.run([str(BIN / 'pcommunicate'), str(missing)],
                            capture_output=True, text=True, timeout=60)
    assert_one_clear_line(result, str(missing))


@pytest.mark.parametrize('key', ['communicator.name', 'communicator.username',
                                 'communicator.password'])
def test_pcommunicate_with_required_key_missing_exits_2_naming_it(make_side, make_central,
                                                                  key: str) -> None:
    central = make_central(make_side('central'), 'http://127.0.0.1:9', **{key: None})
    assert_one_clear_line(central.pcommunicate(), key)


def test_pcommunicate_with_malformed_value_exits_2_naming_it(make_side, make_central) -> None:
    central = make_central(make_side('central'), 'http://127.0.0.1:9',
                           **{'communicator.batch_size': 'abc'})
    assert_one_clear_line(central.pcommunicate(), 'communicator.batch_size')


def test_pcommunicate_never_prints_the_password_when_config_fails(make_side,
                                                                  make_central) -> None:
    central = make_central(make_side('central'), 'ftp://127.0.0.1:9')
    result = central.pcommunicate()
    assert_one_clear_line(result, 'communicator.base_uri')
    assert PASSWORD not in result.stdout + result.stderr


def test_a_session_attribute_the_requests_lack_fails_when_the_app_is_made() -> None:
    config = Configurator(settings={**BASE, 'communicator.dbsession': 'db'})
    config.include('pyramid_communicator')
    with pytest.raises(ConfigurationError) as info:
        config.commit()
    assert "communicator.dbsession = 'db'" in str(info.value)


def test_a_session_attribute_added_after_the_include_is_found() -> None:
    config = Configurator(settings={**BASE, 'communicator.dbsession': 'db'})
    config.include('pyramid_communicator')
    config.add_request_method(lambda request: None, 'db', reify=True)
    config.commit()
