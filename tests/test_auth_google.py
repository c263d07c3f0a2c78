"""Google service accounts: the broker signs a JWT with the account's key and exchanges it at the key's token_uri;
the token endpoint here checks the signature with the public key, and the claims."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from auth_support import IdentityProvider, write_auth_profile
from conftest import World
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

SCOPE = "https://www.googleapis.com/auth/spreadsheets.readonly"
EMAIL = "leads-reader@acme-project.iam.gserviceaccount.com"


@pytest.fixture
def idp() -> Iterator[IdentityProvider]:
    with IdentityProvider(account_email=EMAIL, expected_scope=SCOPE) as provider:
        yield provider


def _key_file(world: World, idp: IdentityProvider, key: rsa.RSAPrivateKey) -> Path:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path = world.home / "sa.json"
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "acme-project", "private_key_id": "k1", "private_key": pem,
        "client_email": EMAIL, "client_id": "1234", "token_uri": f"{idp.base_url}/token",
    }, indent=2))
    path.chmod(0o600)
    return path


def _setup(world: World, idp: IdentityProvider, *, signing_key: rsa.RSAPrivateKey | None = None) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    idp.public_key_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    path = _key_file(world, idp, signing_key or key)
    write_auth_profile(world, "sheets", "sheets", f"{idp.base_url}/api",
                       f'{{ google_service_account = {{ scopes = ["{SCOPE}"] }} }}', secret=f"file:{path}")
    pem = json.loads(path.read_text())["private_key"]
    return str(pem.splitlines()[5])  # a line from the middle of the key, as a canary


LOOP = """
    import os
    from outloop_cli.client import Outloop
    client = Outloop()
    print([client.request("sheets", "GET", "/v4/spreadsheets/1").status for _ in range(2)])
    print(open(f"/proc/{os.getpid()}/environ").read())
"""


def test_the_assertion_is_signed_with_the_account_key_and_carries_the_claims(world: World,
                                                                            idp: IdentityProvider) -> None:
    key_line = _setup(world, idp)
    result = world.run_loop(LOOP, workspace="sheets")
    assert result.code == 0, result.err
    assert result.out.splitlines()[0] == "[200, 200]"
    (call,) = idp.token_calls  # cached: one exchange for both requests
    assert call.ok, call.problem
    assert call.claims["iss"] == EMAIL and call.claims["scope"] == SCOPE
    assert call.claims["aud"] == f"{idp.base_url}/token"
    assert 0 < call.claims["exp"] - call.claims["iat"] <= 3600
    for text in [result.out, result.err, world.audit_bytes().decode("latin-1")]:
        assert key_line not in text
        for token in idp.all_access_tokens():
            assert token not in text
    event = world.events(kind="token")[0]
    assert json.loads(str(event["detail"]))["grant"] == "jwt-bearer" and event["status"] == 200


def test_an_assertion_signed_with_another_key_is_refused_by_the_endpoint(world: World, idp: IdentityProvider) -> None:
    # The positive control for the test above: the endpoint really checks the signature.
    _setup(world, idp, signing_key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
    result = world.run_loop(LOOP, workspace="sheets")
    assert result.out.splitlines()[0] == "[502, 502]"
    assert [call.problem for call in idp.token_calls] == ["bad signature", "bad signature"]
    assert idp.api_calls == []
