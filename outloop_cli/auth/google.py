"""Google service accounts: a JWT signed with the account's private key (RS256), exchanged for an access token.

The private key never leaves the broker; the assertion lives a few minutes and names one audience (the key's
token_uri), so even a captured one is of little use.
"""

from __future__ import annotations

import base64
import json
import time
from typing import TYPE_CHECKING

from outloop_cli.auth.config import GoogleServiceAccount
from outloop_cli.auth.documents import ServiceAccountKey, document_secrets
from outloop_cli.auth.schemes import AuthContext
from outloop_cli.auth.tokens import BearerScheme, TokenCall
from outloop_cli.secrets import Secret

if TYPE_CHECKING:
    from outloop_cli.profiles import Credential

JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_LIFETIME = 3600  # Google's maximum; the assertion is used once, at once


class GoogleScheme(BearerScheme):
    def __init__(self, credential: Credential, document: Secret, context: AuthContext, auth: GoogleServiceAccount,
                 parsed: ServiceAccountKey) -> None:
        super().__init__(credential, document, context)
        self.auth = auth
        self.parsed = parsed

    def _token_call(self, trigger: str) -> TokenCall:
        assertion = signed_assertion(self.parsed, self.auth, now=int(time.time()))
        return TokenCall(url=self.parsed.token_uri, form={"grant_type": JWT_BEARER_GRANT, "assertion": assertion},
                         trigger=trigger, detail={"grant": "jwt-bearer"})

    def secrets(self) -> list[Secret]:
        return [*super().secrets(), *document_secrets(self.parsed)]


def signed_assertion(key: ServiceAccountKey, auth: GoogleServiceAccount, *, now: int) -> str:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    header: dict[str, str] = {"alg": "RS256", "typ": "JWT"}
    if key.private_key_id:
        header["kid"] = key.private_key_id
    claims: dict[str, object] = {"iss": key.client_email, "scope": " ".join(auth.scopes), "aud": key.token_uri,
                                 "iat": now, "exp": now + ASSERTION_LIFETIME}
    if auth.subject:
        claims["sub"] = auth.subject
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    private = load_pem_private_key(key.private_key.reveal().encode(), password=None)
    assert isinstance(private, RSAPrivateKey)  # checked when the document was parsed
    signature = private.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64(signature)}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
