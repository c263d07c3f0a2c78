"""The run's certificate authority: made per run, kept in memory, limited by X.509 name constraints.

The CA may vouch only for this run's credential hosts (permitted DNS subtrees) and for no IP address at all
(excluded subtrees), so a copy that leaks out of the run is worth nothing for any other name. Its key never
leaves this process; only its certificate goes into the child's CA bundle. Leaves share one key (as mitmproxy's
do): the key is as private as the CA's, and one key makes a new host's leaf a signature, not a key generation.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ALPN = ["http/1.1"]  # the broker speaks HTTP/1.1; offering h2 would invite a protocol it cannot judge
_BACKDATE = datetime.timedelta(minutes=5)  # a child's clock a little behind ours must still accept the leaf
_LIFETIME = datetime.timedelta(days=2)  # longer than any run's timeout is likely to be, short if it leaks


class NotInterceptable(ValueError):
    """A leaf was asked for a name outside the CA's constraints; the proxy never asks, this is the backstop."""


class RunCA:
    def __init__(self, names: Sequence[str]) -> None:
        if not names:
            raise ValueError("a run CA needs at least one credential host name")
        self.names = tuple(sorted(set(names)))
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "outloop"),
                             x509.NameAttribute(NameOID.COMMON_NAME, f"outloop run CA {os.urandom(4).hex()}")])
        constraints = x509.NameConstraints(
            permitted_subtrees=[x509.DNSName(name) for name in self.names],
            excluded_subtrees=[x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
                               x509.IPAddress(ipaddress.ip_network("::/0"))])
        public = self._key.public_key()
        self.certificate = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE).not_valid_after(now + _LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(constraints, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self._key, hashes.SHA256()))
        self.pem = self.certificate.public_bytes(serialization.Encoding.PEM)
        self._contexts: dict[str, ssl.SSLContext] = {}

    def leaf(self, name: str) -> x509.Certificate:
        """A server certificate for `name`; refused for a name the constraints would not let a client accept."""
        if name not in self.names:
            raise NotInterceptable(name)
        return self.sign_leaf(name)

    def sign_leaf(self, name: str) -> x509.Certificate:
        """Sign without checking `name`: what a thief holding the CA's key could do (for tests of the constraints)."""
        now = datetime.datetime.now(datetime.UTC)
        public = self._leaf_key.public_key()
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.certificate.subject).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE).not_valid_after(now + _LIFETIME)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                           critical=False)
            .sign(self._key, hashes.SHA256()))

    def server_context(self, name: str) -> ssl.SSLContext:
        """The TLS context that answers a CONNECT to `name`, cached for the run; HTTP/1.1 only.

        A ClientHello naming another host (SNI) is refused: the proxy routes by the CONNECT target, and a client
        that says otherwise in TLS is either confused or probing.
        """
        context = self._contexts.get(name)
        if context is None:
            context = self._contexts[name] = self._new_context(name)
        return context

    def _new_context(self, name: str) -> ssl.SSLContext:
        leaf = self.leaf(name)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(ALPN)
        chain = leaf.public_bytes(serialization.Encoding.PEM) + self.pem
        key = self._leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())
        # ssl loads keys only from files: an anonymous memory file keeps the key off every disk.
        fd = os.memfd_create("outloop-leaf", os.MFD_CLOEXEC)
        try:
            os.write(fd, chain + key)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)

        def check_sni(sslobj: ssl.SSLObject, server_name: str | None, _context: ssl.SSLContext) -> int | None:
            if server_name is not None and server_name.lower().rstrip(".") != name:
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            return None

        context.sni_callback = check_sni
        return context

    def write_bundle(self, path: Path) -> Path:
        """System roots plus this CA, for the child's SSL_CERT_FILE and friends (they replace, not add to, the
        system's bundle in most tools, so the roots must be in it too: egress tunnels still verify upstream)."""
        system = _system_roots()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(system + (b"\n" if system and not system.endswith(b"\n") else b"") + self.pem)
        return path


def _system_roots() -> bytes:
    paths = ssl.get_default_verify_paths()
    for candidate in (os.environ.get(paths.openssl_cafile_env), paths.cafile, paths.openssl_cafile):
        if candidate:
            try:
                return Path(candidate).read_bytes()
            except OSError:
                continue
    return b""
