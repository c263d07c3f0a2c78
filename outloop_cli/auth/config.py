"""The `auth = { ... }` key of a credential: which scheme mints or signs its requests, parsed from the profile.

Kept apart from profiles.py so a new scheme is one dataclass and one parser here, not a change to the schema code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

if TYPE_CHECKING:
    from outloop_cli.profiles import _Reader

GRANTS = ("refresh_token", "client_credentials")
CLIENT_AUTH = ("body", "basic")
SCHEMES = ("oauth2", "aws_sigv4", "google_service_account")
OAUTH2_KEYS = ("token_url", "grant", "client_id", "scopes", "client_auth")
SIGV4_KEYS = ("service", "region")
GOOGLE_KEYS = ("scopes", "subject")
EXAMPLES = {
    "oauth2": 'auth = { oauth2 = { token_url = "https://login.example.com/oauth2/token", '
              'grant = "refresh_token", client_id = "..." } }',
    "aws_sigv4": 'auth = { aws_sigv4 = { service = "s3", region = "eu-west-1" } }',
    "google_service_account": 'auth = { google_service_account = { scopes = '
                              '["https://www.googleapis.com/auth/spreadsheets.readonly"] } }',
}


# NamedTuples, not frozen dataclasses: every profile load imports this module, and a dataclass costs a millisecond
# or more to create, which `outloop run -- true` would pay for each.
class OAuth2(NamedTuple):
    token_url: str
    grant: Literal["refresh_token", "client_credentials"]
    client_id: str
    scopes: tuple[str, ...] = ()
    client_auth: Literal["body", "basic"] = "body"  # where the client secret goes: form body or HTTP basic

    @property
    def scheme(self) -> str:
        return "oauth2"


class AwsSigV4(NamedTuple):
    service: str
    region: str

    @property
    def scheme(self) -> str:
        return "aws_sigv4"


class GoogleServiceAccount(NamedTuple):
    scopes: tuple[str, ...]
    subject: str | None = None  # domain-wide delegation: the user the service account acts as

    @property
    def scheme(self) -> str:
        return "google_service_account"


AuthConfig = OAuth2 | AwsSigV4 | GoogleServiceAccount

# Headers a child's AWS SDK signs with: dropped, so only the broker's signature goes upstream.
SIGV4_CHILD_HEADERS = frozenset({"x-amz-date", "x-amz-security-token", "x-amz-signature", "x-amz-credential",
                                 "x-amz-algorithm", "x-amz-signedheaders", "x-amz-expires"})


def child_signing_headers(auth: AuthConfig) -> frozenset[str]:
    """Child headers to drop beyond Authorization (which is never taken from the child)."""
    return SIGV4_CHILD_HEADERS if isinstance(auth, AwsSigV4) else frozenset()


def parse_auth(reader: _Reader, prefix: str, credential: Mapping[str, Any],
               check_url: Callable[[_Reader, str, str], str]) -> AuthConfig | None:
    """The credential's `auth`, or None; refuses combinations that would hand the child what auth protects."""
    if "auth" not in credential:
        return None
    key = f"{prefix}.auth"
    if "inject" in credential:
        raise reader.fail(key, "`auth` and `inject` are mutually exclusive: the auth scheme sets the Authorization "
                          "itself; remove `inject`")
    if credential.get("reveal") is True:
        raise reader.fail(f"{prefix}.reveal", "a credential with `auth` cannot be revealed: the child would hold "
                          "the refresh token or signing key the broker keeps from it; remove `reveal`")
    table = reader.table(key, credential["auth"])
    reader.check_keys(f"{key}.", table, SCHEMES)
    if len(table) != 1:
        raise reader.fail(key, "set exactly one scheme, e.g. " + EXAMPLES["oauth2"])
    scheme, value = next(iter(table.items()))
    key = f"{key}.{scheme}"
    body = reader.table(key, value)
    if scheme == "oauth2":
        return _oauth2(reader, key, body, check_url)
    if scheme == "aws_sigv4":
        reader.check_keys(f"{key}.", body, SIGV4_KEYS)
        return AwsSigV4(service=_required_word(reader, key, body, "service"),
                        region=_required_word(reader, key, body, "region"))
    reader.check_keys(f"{key}.", body, GOOGLE_KEYS)
    scopes = _scopes(reader, key, body)
    if not scopes:
        raise reader.fail(f"{key}.scopes", "missing; Google issues no token without scopes, e.g. " + EXAMPLES[scheme])
    subject = reader.string(f"{key}.subject", body["subject"]) if "subject" in body else None
    return GoogleServiceAccount(scopes=scopes, subject=subject)


def _oauth2(reader: _Reader, key: str, body: Mapping[str, Any],
            check_url: Callable[[_Reader, str, str], str]) -> OAuth2:
    reader.check_keys(f"{key}.", body, OAUTH2_KEYS)
    for required in ("token_url", "grant", "client_id"):
        if required not in body:
            raise reader.fail(f"{key}.{required}", "missing; e.g. " + EXAMPLES["oauth2"])
    token_url = check_url(reader, f"{key}.token_url", reader.string(f"{key}.token_url", body["token_url"]))
    grant = reader.string(f"{key}.grant", body["grant"])
    if grant not in GRANTS:
        raise reader.fail(f"{key}.grant", f"expected one of {', '.join(GRANTS)}, got {grant!r}")
    client_auth = reader.string(f"{key}.client_auth", body.get("client_auth", "body"))
    if client_auth not in CLIENT_AUTH:
        raise reader.fail(f"{key}.client_auth", f"expected one of {', '.join(CLIENT_AUTH)}, got {client_auth!r}")
    client_id = reader.string(f"{key}.client_id", body["client_id"])
    if not client_id:
        raise reader.fail(f"{key}.client_id", "is empty; write the OAuth2 client (consumer) id")
    return OAuth2(token_url=token_url, grant="refresh_token" if grant == "refresh_token" else "client_credentials",
                  client_id=client_id, scopes=_scopes(reader, key, body),
                  client_auth="basic" if client_auth == "basic" else "body")


def _scopes(reader: _Reader, key: str, body: Mapping[str, Any]) -> tuple[str, ...]:
    scopes = reader.string_list(f"{key}.scopes", body.get("scopes", []))
    for scope in scopes:
        if not scope or any(ch.isspace() for ch in scope):
            raise reader.fail(f"{key}.scopes", f"{scope!r} is not a scope: one scope per list item, no spaces")
    return scopes


def _required_word(reader: _Reader, key: str, body: Mapping[str, Any], name: str) -> str:
    if name not in body:
        raise reader.fail(f"{key}.{name}", "missing; e.g. " + EXAMPLES["aws_sigv4"])
    value = reader.string(f"{key}.{name}", body[name])
    if not value or not all(ch.isalnum() or ch == "-" for ch in value):
        raise reader.fail(f"{key}.{name}", f"{value!r} is not an AWS {name} name such as \"s3\" or \"eu-west-1\"")
    return value
