"""Helpers for egress-proxy tests: a test CA made with `cryptography`, HTTPS recording upstreams named
`localhost`, and a World whose acme profile reaches them through the proxy.

Three upstreams, all on 127.0.0.1 and told apart by port:
- `api`: a credential's host (`base_url = https://localhost:PORT`, the test CA passed by `ca_file`);
- `index`: listed in `[run] egress`, reached through a plain tunnel;
- `third`: in neither list; it must never receive a byte.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import shutil
import ssl
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import World, make_world
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from upstream import RecordingUpstream


def require_tool(name: str) -> None:
    """A client the proxy tests drive; `.ci/run` installs it, so in CI its absence is a failure, not a skip."""
    if shutil.which(name):
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{name} is not installed (CI must run the proxy's client tests: see .ci/run)")
    pytest.skip(f"{name} is not installed")


@dataclass(frozen=True)
class TestCA:
    """A CA on disk (`ca.pem`) and one server certificate for localhost and 127.0.0.1 (`server.pem`, key inside)."""

    ca_pem: Path
    server_pem: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.server_pem)
        return context


def make_test_ca(directory: Path) -> TestCA:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "outloop tests private CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
              .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                          x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                             critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
    ca_pem = directory / "test-ca.pem"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server_pem = directory / "test-server.pem"
    server_pem.write_bytes(server.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    server_pem.chmod(0o600)
    return TestCA(ca_pem=ca_pem, server_pem=server_pem)


PROXY_PROFILE = """
    version = 1
    description = "Acme through the egress proxy"

    [run]
    egress = ["localhost:{INDEX_PORT}"]

    [credentials.api]
    secret = "keyring"
    base_url = "{API}"
    ca_file = "{CA}"
    inject = { header = "Authorization", value = "Bearer {secret}" }
    allow = ["GET /crm/**", "POST /crm/**", "GET /echo-headers", "GET /echo-auth-in-header", "GET /sse",
             "GET /redirect", "GET /info/refs", "POST /git-upload-pack"]
    deny = ["* /crm/*/merge"]
"""


@dataclass
class ProxyWorld:
    world: World
    ca: TestCA
    api: RecordingUpstream
    index: RecordingUpstream
    third: RecordingUpstream

    @property
    def secret(self) -> str:
        return self.world.canaries["acme"]

    def write_profile(self, text: str = PROXY_PROFILE, name: str = "acme") -> None:
        self.world.write_profile(name, self.fill(text))

    def fill(self, text: str) -> str:
        return (textwrap.dedent(text).replace("{API}", self.api.base_url).replace("{CA}", str(self.ca.ca_pem))
                .replace("{INDEX_PORT}", str(self.index.port)).replace("{API_PORT}", str(self.api.port))
                .replace("{THIRD_PORT}", str(self.third.port)))

    def url(self, path: str) -> str:
        return self.api.base_url + path

    def assert_third_untouched(self) -> None:
        assert self.third.requests == [], "a host in neither list received a request"
        assert self.third.all_bytes() == b""


@contextlib.contextmanager
def make_proxy_world() -> Iterator[ProxyWorld]:
    with make_world() as world:
        tls_dir = world.work / "tls"  # the child reads the test CA here: the workspace view shows it the work dir
        tls_dir.mkdir()
        ca = make_test_ca(tls_dir)
        with (RecordingUpstream(tls=ca.server_context(), name="localhost") as api,
              RecordingUpstream(tls=ca.server_context(), name="localhost") as index,
              RecordingUpstream(tls=ca.server_context(), name="localhost") as third):
            proxy_world = ProxyWorld(world=world, ca=ca, api=api, index=index, third=third)
            proxy_world.write_profile()
            world.set_keyring("acme", "api", world.canaries["acme"])
            yield proxy_world
