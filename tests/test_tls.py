"""Mutual TLS: ``communicator.cert`` and ``communicator.key`` give
``pcommunicate`` a client certificate, checked against a facade served by
gunicorn over HTTPS that requires one (``--cert-reqs 2``).  The CA, the
server's and the client's certificates are made for each run with the
``openssl`` command.
"""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
from conftest import BIN, PASSWORD, USERNAME, Server, Side, app_settings, free_port, write_ini
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError
from test_end_to_end import central_post, posts_by_title, summary
from test_pcommunicate import error_line, run

from pyramid_communicator import get_settings

pytestmark = pytest.mark.skipif(shutil.which('openssl') is None,
                                reason='needs the openssl command')


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(['openssl', *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def issue(directory: Path, name: str, extensions: str) -> None:
    """``name.key`` and ``name.pem``, signed by the CA in ``directory``."""
    openssl('req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1',
            '-nodes', '-keyout', f'{name}.key', '-out', f'{name}.csr',
            '-subj', f'/CN={name}', cwd=directory)
    (directory / f'{name}.ext').write_text(
        extensions + '\nsubjectKeyIdentifier = hash\n'
        'authorityKeyIdentifier = keyid,issuer\n')
    openssl('x509', '-req', '-in', f'{name}.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key',
            '-CAcreateserial', '-days', '2', '-sha256', '-extfile', f'{name}.ext',
            '-out', f'{name}.pem', cwd=directory)


@pytest.fixture(scope='module')
def pki(tmp_path_factory) -> Path:
    """A private CA with a server certificate for 127.0.0.1 and a client
    certificate; ``client-combined.pem`` holds the client's key and cert."""
    directory = tmp_path_factory.mktemp('pki')
    openssl('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1',
            '-nodes', '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '2', '-sha256',
            '-subj', '/CN=communicator test CA',
            '-addext', 'basicConstraints = critical,CA:TRUE',
            '-addext', 'keyUsage = critical,keyCertSign,cRLSign', cwd=directory)
    issue(directory, 'server', 'subjectAltName = IP:127.0.0.1\n'
          'extendedKeyUsage = serverAuth\nkeyUsage = critical,digitalSignature')
    issue(directory, 'client', 'extendedKeyUsage = clientAuth\n'
          'keyUsage = critical,digitalSignature')
    (directory / 'client-combined.pem').write_text(
        (directory / 'client.key').read_text() + (directory / 'client.pem').read_text())
    return directory


@pytest.fixture
def tls_facade(tmp_path, make_side, pki):
    """The demo facade under gunicorn on https://127.0.0.1:PORT, requiring
    a client certificate issued by the test CA."""
    side = make_side('facade')
    port = free_port()
    ini = write_ini(tmp_path / 'facade.ini', app_settings(side))
    server = Server(side, ini, port, tmp_path / 'facade.log')
    server.url = f'https://127.0.0.1:{port}'
    server.process = subprocess.Popen(
        [str(BIN / 'gunicorn'), '--paste', str(ini), '-w', '1', '-b', f'127.0.0.1:{port}',
         '--certfile', str(pki / 'server.pem'), '--keyfile', str(pki / 'server.key'),
         '--ca-certs', str(pki / 'ca.pem'), '--cert-reqs', '2', '--graceful-timeout', '5'],
        stdout=server.log.open('ab'), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.process.poll() is None, server.log.read_text()[-2000:]
            try:
                requests.get(server.url + '/posts', timeout=5, verify=str(pki / 'ca.pem'),
                             cert=(str(pki / 'client.pem'), str(pki / 'client.key')))
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise RuntimeError('gunicorn did not start within 30 seconds') from None
                time.sleep(0.02)
        yield server
    finally:
        server.stop()


def test_with_the_client_certificate_pcommunicate_syncs(tls_facade, make_side, make_central,
                                                         pki, monkeypatch):
    # requests lets this variable override a session's CA bundle; ours holds.
    monkeypatch.setenv('REQUESTS_CA_BUNDLE', str(pki / 'client.pem'))
    central = make_central(make_side('central'), tls_facade.url,
                           **{'communicator.verify': pki / 'ca.pem',
                              'communicator.cert': pki / 'client.pem',
                              'communicator.key': pki / 'client.key'})
    central_post(central, title='over mutual TLS')
    result = run(central)
    assert result.returncode == 0, result.stderr
    assert summary(result.stdout) == dict(pushed=1, pulled=0, applied=0, failed=0, waiting=0)
    assert set(posts_by_title(tls_facade.side)) == {'over mutual TLS'}


def test_a_certificate_file_holding_its_key_needs_no_key_setting(tls_facade, make_side,
                                                                  make_central, pki):
    central = make_central(make_side('central'), tls_facade.url,
                           **{'communicator.verify': pki / 'ca.pem',
                              'communicator.cert': pki / 'client-combined.pem'})
    central_post(central, title='one file')
    result = run(central)
    assert result.returncode == 0, result.stderr
    assert set(posts_by_title(tls_facade.side)) == {'one file'}


def test_without_a_client_certificate_pcommunicate_fails_in_one_line(tls_facade, make_side,
                                                                      make_central, pki):
    central = make_central(make_side('central'), tls_facade.url,
                           **{'communicator.verify': pki / 'ca.pem'})
    central_post(central, title='stays here')
    result = run(central)  # no traceback, no password
    assert result.returncode == 1
    line = error_line(result)
    assert tls_facade.url in line and 'communicator.cert' in line, line
    assert 'requires a client certificate' in line, line
    assert tls_facade.side.count('inbound_messages') == 0
    assert central.side.count('outbound_messages', 'delivered_at IS NULL') == 1


def test_a_server_certificate_of_an_unknown_ca_names_communicator_verify(
        tls_facade, make_side, make_central, pki):
    central = make_central(make_side('central'), tls_facade.url,
                           **{'communicator.cert': pki / 'client-combined.pem'})
    result = run(central)
    assert result.returncode == 1
    line = error_line(result)
    assert 'certificate verify failed' in line and 'communicator.verify' in line, line


# -- the settings ----------------------------------------------------------------

def include(**tls: object) -> Configurator:
    config = Configurator(settings={'communicator.name': 'central',
                                    'communicator.username': USERNAME,
                                    'communicator.password': PASSWORD,
                                    **{f'communicator.{k}': str(v) for k, v in tls.items()}})
    config.include('pyramid_communicator')
    return config


def include_error(**tls: object) -> str:
    with pytest.raises(ConfigurationError) as info:
        include(**tls)
    message = str(info.value)
    assert '\n' not in message
    return message


def test_cert_and_key_are_read_as_paths(pki):
    settings = get_settings(include(cert=pki / 'client.pem', key=pki / 'client.key').registry)
    assert (settings.cert, settings.key) == (str(pki / 'client.pem'), str(pki / 'client.key'))
    settings = get_settings(include().registry)
    assert (settings.cert, settings.key) == (None, None)


@pytest.mark.parametrize('key', ['cert', 'key'])
def test_a_missing_file_is_an_error_naming_the_key(pki, tmp_path, key):
    paths = {'cert': pki / 'client.pem', key: tmp_path / 'nowhere.pem'}
    message = include_error(**paths)
    assert message.startswith(f'communicator.{key} = ') and 'no such file' in message


def test_a_key_without_a_cert_is_an_error_naming_the_key(pki):
    message = include_error(key=pki / 'client.key')
    assert message.startswith('communicator.key ') and 'communicator.cert' in message


def test_pcommunicate_with_a_missing_cert_file_exits_2_naming_it(make_side, make_central,
                                                                 tmp_path):
    side: Side = make_side('central')
    central = make_central(side, 'https://127.0.0.1:9',
                           **{'communicator.cert': tmp_path / 'gone.pem'})
    result = run(central)
    assert result.returncode == 2
    assert 'communicator.cert' in error_line(result)
