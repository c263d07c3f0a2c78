"""The secret behind an `auth` credential: a small TOML or JSON document, checked field by field.

Errors name the credential and the missing or malformed field, never a value; every field that is a secret becomes a
`Secret` the moment it is parsed.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from outloop_cli.auth.config import AuthConfig, AwsSigV4, GoogleServiceAccount, OAuth2
from outloop_cli.errors import SecretError
from outloop_cli.secrets import Secret, resolve_secret

if TYPE_CHECKING:
    from outloop_cli.profiles import Credential

EXAMPLE_DOCUMENTS = {
    "oauth2/refresh_token": 'refresh_token = "..."\nclient_secret = "..."   # if the client has one',
    "oauth2/client_credentials": 'client_secret = "..."',
    "aws_sigv4": 'access_key_id = "AKIA..."\nsecret_access_key = "..."\nsession_token = "..."   # optional',
    "google_service_account": "the service account's JSON key file, as Google's console downloads it",
}


@dataclass
class OAuth2Secret:
    refresh_token: Secret | None
    client_secret: Secret | None


@dataclass
class AwsKeys:
    access_key_id: Secret
    secret_access_key: Secret
    session_token: Secret | None


@dataclass
class ServiceAccountKey:
    client_email: str
    private_key: Secret
    private_key_id: str | None
    token_uri: str


Document = OAuth2Secret | AwsKeys | ServiceAccountKey


def document_kind(auth: AuthConfig) -> str:
    return f"oauth2/{auth.grant}" if isinstance(auth, OAuth2) else auth.scheme


def parse_document(auth: AuthConfig, text: str, where: str) -> Document:
    """Parse and check the document `auth` needs; `where` names the workspace and credential for errors."""
    fields = _load(text, where, auth)
    if isinstance(auth, OAuth2):
        needed = ("refresh_token",) if auth.grant == "refresh_token" else ("client_secret",)
        _check_fields(fields, where, auth, required=needed, optional=("refresh_token", "client_secret"))
        return OAuth2Secret(refresh_token=_secret(fields, "refresh_token"),
                            client_secret=_secret(fields, "client_secret"))
    if isinstance(auth, AwsSigV4):
        _check_fields(fields, where, auth, required=("access_key_id", "secret_access_key"),
                      optional=("session_token",))
        access_key = _secret(fields, "access_key_id")
        secret_key = _secret(fields, "secret_access_key")
        assert access_key is not None and secret_key is not None
        return AwsKeys(access_key, secret_key, _secret(fields, "session_token"))
    return _service_account(fields, where, auth)


def _service_account(fields: dict[str, Any], where: str, auth: GoogleServiceAccount) -> ServiceAccountKey:
    # Google's key file carries more (project_id, auth_uri...): those are allowed and ignored.
    _check_fields(fields, where, auth, required=("type", "client_email", "private_key", "token_uri"), optional=None)
    if fields["type"] != "service_account":
        raise SecretError(f"{where}: field `type` is not \"service_account\"; use a service account's JSON key")
    token_uri = fields["token_uri"]
    parts = urlsplit(token_uri)
    if parts.scheme != "https" and not (parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1")):
        raise SecretError(f"{where}: field `token_uri` must be an https URL (http only for loopback)")
    _load_private_key(fields["private_key"], where)
    key_id = fields.get("private_key_id")
    return ServiceAccountKey(client_email=fields["client_email"], private_key=Secret(fields["private_key"]),
                             private_key_id=key_id if isinstance(key_id, str) and key_id else None,
                             token_uri=token_uri)


def _load_private_key(pem: str, where: str) -> None:
    """Refuse a key `cryptography` cannot use for RS256 now, not at the run's first request."""
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        raise SecretError(f"{where}: field `private_key` is not an unencrypted PEM private key") from None
    if not isinstance(key, RSAPrivateKey):
        raise SecretError(f"{where}: field `private_key` is not an RSA key (RS256 needs one)")


def document_secrets(document: Document) -> list[Secret]:
    """Every secret in the document: what the redactor masks and what the run wipes."""
    if isinstance(document, OAuth2Secret):
        return [s for s in (document.refresh_token, document.client_secret) if s is not None]
    if isinstance(document, AwsKeys):
        return [s for s in (document.access_key_id, document.secret_access_key, document.session_token)
                if s is not None]
    return [document.private_key]


def with_refresh_token(text: str, new_token: str) -> str:
    """The document with its refresh token replaced (as compact JSON), for writing back whole."""
    data = json.loads(text) if text.lstrip().startswith("{") else tomllib.loads(text)
    data["refresh_token"] = new_token
    return json.dumps(data, separators=(",", ":"))


def compact_document(auth: AuthConfig, text: str, where: str) -> str:
    """The checked document as one line of JSON: keyring values stay single-line whatever the input format."""
    check_document(auth, text, where)
    return json.dumps(_load(text, where, auth), separators=(",", ":"))


def _load(text: str, where: str, auth: AuthConfig) -> dict[str, Any]:
    example = EXAMPLE_DOCUMENTS[document_kind(auth)]
    fix = f"the secret of an {auth.scheme} credential is a TOML or JSON document, e.g.\n{example}"
    try:
        data: object = json.loads(text) if text.lstrip().startswith("{") else tomllib.loads(text)
    except json.JSONDecodeError as exc:  # the messages give a position, never the text
        raise SecretError(f"{where}: the secret is not valid JSON (line {exc.lineno}); {fix}") from None
    except tomllib.TOMLDecodeError:
        raise SecretError(f"{where}: the secret is not valid TOML or JSON; {fix}") from None
    if not isinstance(data, dict):
        raise SecretError(f"{where}: the secret is not a TOML or JSON table; {fix}")
    return data


def _check_fields(fields: Mapping[str, Any], where: str, auth: AuthConfig, *, required: tuple[str, ...],
                  optional: tuple[str, ...] | None) -> None:
    example = EXAMPLE_DOCUMENTS[document_kind(auth)]
    for name in required:
        if name not in fields:
            raise SecretError(f"{where}: the secret document has no `{name}` field, which {document_kind(auth)} "
                              f"needs; e.g.\n{example}")
    if optional is not None:
        for name in fields:
            if name not in required and name not in optional:
                raise SecretError(f"{where}: the secret document has an unknown field `{name}`; "
                                  f"fields: {', '.join(dict.fromkeys((*required, *optional)))}")
    for name in fields:
        if (name in required or (optional and name in optional)) and not (isinstance(fields[name], str)
                                                                         and fields[name]):
            raise SecretError(f"{where}: field `{name}` of the secret document must be a non-empty string")
        if isinstance(fields[name], str) and "\0" in fields[name]:
            raise SecretError(f"{where}: field `{name}` of the secret document contains a NUL")
    for name in ("refresh_token", "client_secret", "access_key_id", "secret_access_key", "session_token"):
        value = fields.get(name)
        if isinstance(value, str) and any(ch in value for ch in "\r\n"):
            raise SecretError(f"{where}: field `{name}` of the secret document contains a line break")


def _secret(fields: Mapping[str, Any], name: str) -> Secret | None:
    value = fields.get(name)
    return Secret(value) if isinstance(value, str) and value else None


def resolve_credential_secret(credential: Credential, environ: Mapping[str, str]) -> Secret:
    """The credential's secret as the run holds it; an `auth` credential's document is checked field by field."""
    auth = credential.auth
    secret = resolve_secret(credential.owner, credential.name, credential.secret_ref, environ,
                            document=auth is not None)
    if auth is not None:
        try:
            check_document(auth, secret.reveal(), f"workspace {credential.owner!r}, credential {credential.name!r}")
        except SecretError:
            secret.wipe()
            raise
    return secret


def document_values(auth: AuthConfig, text: str) -> list[str]:
    """Each secret field's value (for checks that the child's environment holds none of them)."""
    secrets = document_secrets(parse_document(auth, text, "the secret document"))
    values = [secret.reveal() for secret in secrets]
    for secret in secrets:
        secret.wipe()
    return values


def check_document(auth: AuthConfig, text: str, where: str) -> None:
    """Parse the document only to judge it; the parsed secrets are wiped at once."""
    for secret in document_secrets(parse_document(auth, text, where)):
        secret.wipe()
