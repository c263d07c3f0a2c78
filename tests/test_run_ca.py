"""The run's CA: name constraints OpenSSL enforces, leaves only for credential hosts, SNI and ALPN held to HTTP/1.1.

The handshakes here run in memory (ssl.MemoryBIO), so each property is checked without a socket; the same CA
serving real clients is covered by test_proxy_clients.py.
"""

from __future__ import annotations

import contextlib
import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from proxy_support import require_tool

from outloop_cli.broker.ca import NotInterceptable, RunCA

CA = RunCA(["api.github.com", "localhost"])


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _openssl_verify(tmp_path: Path, leaf: x509.Certificate, name: str | None = None
                    ) -> subprocess.CompletedProcess[str]:
    (tmp_path / "ca.pem").write_bytes(CA.pem)
    (tmp_path / "leaf.pem").write_bytes(_pem(leaf))
    argv = ["openssl", "verify", "-CAfile", str(tmp_path / "ca.pem")]
    argv += ["-verify_hostname", name] if name else []
    return subprocess.run([*argv, str(tmp_path / "leaf.pem")], capture_output=True, text=True, check=False)


@pytest.fixture
def needs_openssl() -> None:
    require_tool("openssl")


@pytest.mark.usefixtures("needs_openssl")
def test_a_leaf_for_a_credential_host_verifies(tmp_path: Path) -> None:
    result = _openssl_verify(tmp_path, CA.leaf("api.github.com"), "api.github.com")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.usefixtures("needs_openssl")
@pytest.mark.parametrize("name", ["evil.example", "github.com", "api.github.com.evil.example"])
def test_the_ca_cannot_vouch_for_another_name_even_with_its_key(tmp_path: Path, name: str) -> None:
    """What a thief holding the CA's private key could sign; OpenSSL refuses it by the name constraints."""
    result = _openssl_verify(tmp_path, CA.sign_leaf(name))
    assert result.returncode != 0
    assert "permitted subtree violation" in result.stdout + result.stderr


@pytest.mark.usefixtures("needs_openssl")
def test_a_subdomain_of_a_credential_host_is_inside_the_constraints(tmp_path: Path) -> None:
    # RFC 5280: a DNS constraint covers the name and its subdomains. The proxy never mints one (leaf() refuses),
    # so this is the limit of what a leaked CA could do: names under this run's credential hosts.
    assert _openssl_verify(tmp_path, CA.sign_leaf("x.api.github.com")).returncode == 0
    with pytest.raises(NotInterceptable):
        CA.leaf("x.api.github.com")


def test_the_ca_carries_critical_name_constraints_excluding_every_ip_address() -> None:
    extension = CA.certificate.extensions.get_extension_for_class(x509.NameConstraints)
    assert extension.critical
    constraints = extension.value
    assert sorted(name.value for name in constraints.permitted_subtrees or []) == ["api.github.com", "localhost"]
    assert sorted(str(net.value) for net in constraints.excluded_subtrees or []) == ["0.0.0.0/0", "::/0"]
    basic = CA.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca and basic.path_length == 0


def test_leaves_are_refused_for_names_outside_the_run() -> None:
    with pytest.raises(NotInterceptable):
        CA.leaf("evil.example")


def test_each_run_has_its_own_ca() -> None:
    assert RunCA(["localhost"]).pem != RunCA(["localhost"]).pem


def test_the_bundle_holds_the_system_roots_and_the_ca(tmp_path: Path) -> None:
    bundle = CA.write_bundle(tmp_path / "bundle.pem").read_bytes()
    system = Path(ssl.get_default_verify_paths().openssl_cafile).read_bytes()
    assert bundle.startswith(system) and bundle.endswith(CA.pem)


def _handshake(server_name: str, connect_as: str, alpn: list[str] | None = None, check_hostname: bool = True
               ) -> ssl.SSLObject:
    client_context = ssl.create_default_context(cadata=CA.pem.decode())
    client_context.check_hostname = check_hostname
    if alpn:
        client_context.set_alpn_protocols(alpn)
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context.wrap_bio(client_in, client_out, server_hostname=server_name)
    server = CA.server_context(connect_as).wrap_bio(server_in, server_out, server_side=True)
    for _ in range(10):
        for side, outgoing, incoming in ((client, client_out, server_in), (server, server_out, client_in)):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
            incoming.write(outgoing.read())
        if client.version() and server.version():
            break
    client.do_handshake()
    return client


def test_a_client_trusting_the_bundle_completes_tls_for_the_connect_target() -> None:
    client = _handshake("api.github.com", "api.github.com", ["http/1.1"])
    assert client.selected_alpn_protocol() == "http/1.1"


def test_an_sni_other_than_the_connect_target_is_refused() -> None:
    # The client skips its own name check, as a hostile one would: only the proxy's SNI check stands in the way.
    with pytest.raises(ssl.SSLError, match=r"CALLBACK_FAILED|UNRECOGNIZED_NAME"):
        _handshake("localhost", "api.github.com", check_hostname=False)
    assert _handshake("api.github.com", "api.github.com", check_hostname=False).version()


def test_only_http_1_1_is_offered_whatever_the_client_asks_for() -> None:
    assert _handshake("api.github.com", "api.github.com", ["h2", "http/1.1"]).selected_alpn_protocol() == "http/1.1"
    assert _handshake("api.github.com", "api.github.com", ["h2"]).selected_alpn_protocol() is None
