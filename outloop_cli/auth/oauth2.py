"""OAuth2 `refresh_token` and `client_credentials` grants: the broker holds the long-lived secret, mints the rest.

A refresh token the endpoint rotates is written back to the secret's source at once (the whole document, one write),
so the next run starts from the token that is still valid; where the source cannot be written, the run says so.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from outloop_cli.auth.config import OAuth2
from outloop_cli.auth.documents import OAuth2Secret, document_secrets, with_refresh_token
from outloop_cli.auth.schemes import AuthContext
from outloop_cli.auth.tokens import BearerScheme, TokenCall
from outloop_cli.secrets import Secret

if TYPE_CHECKING:
    from outloop_cli.profiles import Credential


class OAuth2Scheme(BearerScheme):
    def __init__(self, credential: Credential, document: Secret, context: AuthContext, auth: OAuth2,
                 parsed: OAuth2Secret) -> None:
        super().__init__(credential, document, context)
        self.auth = auth
        self.parsed = parsed
        self._retired: list[Secret] = []  # earlier refresh tokens, masked (and wiped) like the current one

    def _token_call(self, trigger: str) -> TokenCall:
        form: dict[str, str] = {"grant_type": self.auth.grant}
        if self.auth.grant == "refresh_token":
            assert self.parsed.refresh_token is not None
            form["refresh_token"] = self.parsed.refresh_token.reveal()
        if self.auth.scopes:
            form["scope"] = " ".join(self.auth.scopes)
        secret = self.parsed.client_secret.reveal() if self.parsed.client_secret else None
        basic = None
        if self.auth.client_auth == "basic" and secret is not None:
            basic = (self.auth.client_id, secret)
        else:
            form["client_id"] = self.auth.client_id
            if secret is not None:
                form["client_secret"] = secret
        return TokenCall(url=self.auth.token_url, form=form, trigger=trigger, basic=basic,
                         detail={"grant": self.auth.grant})

    async def _rotated(self, refresh_token: str) -> None:
        current = self.parsed.refresh_token
        if current is None or current.reveal() == refresh_token:
            return
        self._retired.append(current)
        self.parsed.refresh_token = Secret(refresh_token)
        updated = Secret(with_refresh_token(self.document.reveal(), refresh_token))
        self._retired.append(self.document)
        self.document = updated
        if not await asyncio.to_thread(self.context.write_back, self.credential, updated.reveal()):
            self.context.warn(f"credential {self.credential.name!r}: the token endpoint rotated the refresh token, "
                              f"but its secret source ({self.credential.secret_ref.partition(':')[0]}) cannot be "
                              "written; store the new one (e.g. secret = \"keyring\" and `outloop secret set`) "
                              "or the next run may be refused")

    def secrets(self) -> list[Secret]:
        return [*super().secrets(), *document_secrets(self.parsed), *self._retired]
