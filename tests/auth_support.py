"""A real identity provider and API for the `auth` schemes: an OAuth2 token endpoint and a bearer-protected API.

One ThreadingHTTPServer on 127.0.0.1:
- `POST /token`: grants refresh_token (rotating the refresh token on each use), client_credentials, and the JWT
  bearer grant of Google service accounts (the assertion's RS256 signature checked with the account's public key,
  and its iss, scope, aud and exp claims).
- `/api/...`: 200 only with a live access token this endpoint issued; `/api/revoke` revokes the token it was called
  with; `/api/echo-auth` answers with the Authorization header it got (a hostile upstream echoing the token).
Every token call and API call is recorded, for the tests to judge.
"""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class TokenCall:
    grant: str
    at: float
    ok: bool
    problem: str | None = None
    form: dict[str, str] = field(default_factory=dict)
    claims: dict[str, Any] = field(default_factory=dict)


@dataclass
class ApiCall:
    method: str
    path: str
    status: int
    token: str | None


@dataclass
class IdentityProvider:
    client_id: str = "outloop-test-client"
    client_secret: str = ""
    refresh_token: str = ""
    lifetime: float = 3600.0
    rotate: bool = True
    public_key_pem: bytes | None = None  # a Google service account's public key
    account_email: str = ""
    expected_scope: str = ""
    token_calls: list[TokenCall] = field(default_factory=list)
    api_calls: list[ApiCall] = field(default_factory=list)
    issued: dict[str, tuple[float, float]] = field(default_factory=dict)  # access token -> (issued, expires)
    revoked: set[str] = field(default_factory=set)
    refresh_tokens_issued: list[str] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)  # request bodies the API received
    lock: threading.Lock = field(default_factory=threading.Lock)
    _server: http.server.ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> IdentityProvider:
        provider = self

        class Handler(_Handler):
            idp = provider

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    def all_access_tokens(self) -> list[str]:
        return list(self.issued)

    # -- token endpoint ------------------------------------------------------------------------------------

    def token(self, form: dict[str, str], basic: tuple[str, str] | None) -> tuple[int, dict[str, Any]]:
        grant = form.get("grant_type", "")
        with self.lock:
            if grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
                problem, claims = self._check_assertion(form.get("assertion", ""))
            else:
                problem, claims = self._check_client(form, basic, grant), {}
            self.token_calls.append(TokenCall(grant, time.time(), problem is None, problem, form, claims))
            if problem is not None:
                return 400, {"error": "invalid_grant", "error_description": problem}
            access = f"at-{uuid.uuid4().hex}"
            now = time.time()
            self.issued[access] = (now, now + self.lifetime)
            answer: dict[str, Any] = {"access_token": access, "token_type": "Bearer", "expires_in": self.lifetime}
            if grant == "refresh_token" and self.rotate:
                self.refresh_token = f"rt-{uuid.uuid4().hex}"
                self.refresh_tokens_issued.append(self.refresh_token)
                answer["refresh_token"] = self.refresh_token
            return 200, answer

    def _check_client(self, form: dict[str, str], basic: tuple[str, str] | None, grant: str) -> str | None:
        client_id, secret = basic if basic else (form.get("client_id"), form.get("client_secret"))
        if client_id != self.client_id or (self.client_secret and secret != self.client_secret):
            return "bad client"
        if grant == "refresh_token":
            return None if form.get("refresh_token") == self.refresh_token else "stale or unknown refresh token"
        return None if grant == "client_credentials" else "unsupported grant"

    def _check_assertion(self, assertion: str) -> tuple[str | None, dict[str, Any]]:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding, rsa
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        try:
            header_b64, claims_b64, signature_b64 = assertion.split(".")
            header, claims = json.loads(_unb64(header_b64)), json.loads(_unb64(claims_b64))
        except ValueError:
            return "malformed assertion", {}
        assert self.public_key_pem is not None
        key = load_pem_public_key(self.public_key_pem)
        assert isinstance(key, rsa.RSAPublicKey)
        try:
            key.verify(_unb64(signature_b64), f"{header_b64}.{claims_b64}".encode(), padding.PKCS1v15(),
                       hashes.SHA256())
        except InvalidSignature:
            return "bad signature", claims
        now = time.time()
        if header.get("alg") != "RS256":
            return "alg is not RS256", claims
        if claims.get("iss") != self.account_email:
            return "wrong iss", claims
        if claims.get("scope") != self.expected_scope:
            return "wrong scope", claims
        if claims.get("aud") != f"{self.base_url}/token":
            return "wrong aud", claims
        if not (now < claims.get("exp", 0) <= now + 3600 + 5) or claims.get("iat", 0) > now + 5:
            return "expired or too long-lived", claims
        return None, claims

    # -- API -----------------------------------------------------------------------------------------------

    def api(self, method: str, path: str, authorization: str | None) -> tuple[int, dict[str, Any]]:
        token = authorization.removeprefix("Bearer ") if authorization and authorization.startswith("Bearer ") \
            else None
        with self.lock:
            live = token in self.issued and token not in self.revoked and time.time() < self.issued[token][1]
            status = 200 if live else 401
            self.api_calls.append(ApiCall(method, path, status, token))
            if not live:
                return 401, {"error": "invalid_token"}
            if path == "/api/revoke":
                assert token is not None
                self.revoked.add(token)
        if path == "/api/echo-auth":
            return 200, {"authorization": authorization}
        return 200, {"ok": True, "path": path}


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    idp: IdentityProvider

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def do_POST(self) -> None:
        self._handle()

    def do_GET(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = urlsplit(self.path).path
        if path == "/token" and self.command == "POST":
            form = {key: values[-1] for key, values in parse_qs(body.decode()).items()}
            basic = None
            auth = self.headers.get("Authorization", "")
            if auth.startswith("Basic "):
                user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                basic = (user, password)
            status, answer = self.idp.token(form, basic)
        else:
            if body:
                self.idp.bodies.append(body)
            status, answer = self.idp.api(self.command, path, self.headers.get("Authorization"))
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def write_auth_profile(world: Any, name: str, credential: str, base_url: str, auth: str,
                       secret: str = "keyring") -> None:
    world.write_profile(name, f"""
        version = 1
        [credentials.{credential}]
        secret = "{secret}"
        base_url = "{base_url}"
        auth = {auth}
        allow = ["* /**"]
    """)
