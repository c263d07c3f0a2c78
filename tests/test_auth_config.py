"""The `auth` profile key and the secret documents behind it: every mistake is named (file, key or field), no value
is ever printed, and `secret set` / `workspace check` judge a document the way a run would."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from conftest import World
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from test_cmd_secret import keyring_value

from outloop_cli.auth.config import AwsSigV4, GoogleServiceAccount, OAuth2
from outloop_cli.auth.documents import AwsKeys, OAuth2Secret, ServiceAccountKey, parse_document
from outloop_cli.errors import ProfileError, SecretError
from outloop_cli.profiles import load_profile

OAUTH = ('auth = { oauth2 = { token_url = "https://login.example.com/token", grant = "refresh_token", '
         'client_id = "c" } }')


def _load(tmp_path: Path, credential_lines: str) -> OAuth2 | AwsSigV4 | GoogleServiceAccount | None:
    (tmp_path / "w.toml").write_text(textwrap.dedent("""
        version = 1
        [credentials.api]
        secret = "keyring"
        base_url = "https://api.example.com"
    """) + textwrap.dedent(credential_lines))
    return load_profile("w", [tmp_path]).credentials["api"].auth


def test_the_three_schemes_parse(tmp_path: Path) -> None:
    assert _load(tmp_path, OAUTH) == OAuth2(token_url="https://login.example.com/token", grant="refresh_token",
                                            client_id="c")
    assert _load(tmp_path, 'auth = { aws_sigv4 = { service = "s3", region = "eu-west-1" } }') == \
        AwsSigV4(service="s3", region="eu-west-1")
    assert _load(tmp_path, 'auth = { google_service_account = { scopes = ["https://x/y"] } }') == \
        GoogleServiceAccount(scopes=("https://x/y",))
    assert _load(tmp_path, "") is None


@pytest.mark.parametrize(("lines", "message"), [
    (OAUTH + '\ninject = { header = "X-Key" }', "credentials.api.auth: `auth` and `inject` are mutually exclusive"),
    (OAUTH + "\nreveal = true", "credentials.api.reveal: a credential with `auth` cannot be revealed"),
    ('auth = { oauth3 = {} }', "credentials.api.auth.oauth3: unknown key; did you mean `oauth2`?"),
    ('auth = {}', "credentials.api.auth: set exactly one scheme"),
    ('auth = { oauth2 = { grant = "refresh_token", client_id = "c" } }', "auth.oauth2.token_url: missing"),
    ('auth = { oauth2 = { token_url = "http://login.example.com/t", grant = "refresh_token", client_id = "c" } }',
     "auth.oauth2.token_url: plain http would send the secret in clear text"),
    ('auth = { oauth2 = { token_url = "https://l/t", grant = "password", client_id = "c" } }',
     "auth.oauth2.grant: expected one of refresh_token, client_credentials, got 'password'"),
    ('auth = { oauth2 = { token_url = "https://l/t", grant = "refresh_token", client_id = "c", scopes = ["a b"] } }',
     "auth.oauth2.scopes: 'a b' is not a scope"),
    ('auth = { aws_sigv4 = { service = "s3" } }', "auth.aws_sigv4.region: missing"),
    ('auth = { aws_sigv4 = { service = "s3", region = "eu west" } }', "auth.aws_sigv4.region: 'eu west' is not"),
    ('auth = { google_service_account = { } }', "auth.google_service_account.scopes: missing"),
])
def test_profile_mistakes_are_named(tmp_path: Path, lines: str, message: str) -> None:
    with pytest.raises(ProfileError) as caught:
        _load(tmp_path, lines)
    assert message in caught.value.message


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _service_account(**overrides: object) -> str:
    document = {"type": "service_account", "client_email": "a@b.iam.gserviceaccount.com",
                "private_key": _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
                "token_uri": "https://oauth2.googleapis.com/token", "project_id": "p"}
    document.update(overrides)
    return json.dumps({key: value for key, value in document.items() if value is not None})


REFRESH = OAuth2(token_url="https://l/t", grant="refresh_token", client_id="c")
CLIENT = OAuth2(token_url="https://l/t", grant="client_credentials", client_id="c")
SIGV4 = AwsSigV4(service="s3", region="eu-west-1")
GOOGLE = GoogleServiceAccount(scopes=("s",))


def test_documents_parse_from_toml_or_json_into_secrets() -> None:
    parsed = parse_document(REFRESH, 'refresh_token = "rt-value"\nclient_secret = "cs-value"\n', "w")
    assert isinstance(parsed, OAuth2Secret) and parsed.refresh_token and parsed.refresh_token.reveal() == "rt-value"
    assert "rt-value" not in repr(parsed)
    keys = parse_document(SIGV4, '{"access_key_id": "AKIA1", "secret_access_key": "sk", "session_token": "st"}', "w")
    assert isinstance(keys, AwsKeys) and keys.session_token and keys.session_token.reveal() == "st"
    account = parse_document(GOOGLE, _service_account(), "w")
    assert isinstance(account, ServiceAccountKey) and account.client_email == "a@b.iam.gserviceaccount.com"


@pytest.mark.parametrize(("auth", "text", "message"), [
    (REFRESH, 'client_secret = "cnry-doc-value"', "no `refresh_token` field, which oauth2/refresh_token needs"),
    (CLIENT, 'refresh_token = "cnry-doc-value"', "no `client_secret` field, which oauth2/client_credentials needs"),
    (REFRESH, 'refresh_token = "cnry-doc-value"\nclient_secert = "x"', "unknown field `client_secert`"),
    (REFRESH, 'refresh_token = ""', "field `refresh_token` of the secret document must be a non-empty string"),
    (SIGV4, 'access_key_id = "AKIA"\nsecret_key = "cnry-doc-value"', "no `secret_access_key` field"),
    (SIGV4, '{"access_key_id": "AKIA", "secret_access_key": "cnry-doc-value"', "not valid JSON (line 1)"),
    (SIGV4, "cnry-doc-value", "not valid TOML or JSON"),
    (GOOGLE, _service_account(private_key=None), "no `private_key` field"),
    (GOOGLE, _service_account(private_key="cnry-doc-value"), "`private_key` is not an unencrypted PEM private key"),
    (GOOGLE, _service_account(private_key=_pem(ec.generate_private_key(ec.SECP256R1()))), "not an RSA key"),
    (GOOGLE, _service_account(type="authorized_user"), "field `type` is not \"service_account\""),
    (GOOGLE, _service_account(token_uri="http://evil.example/token"), "`token_uri` must be an https URL"),
])
def test_document_mistakes_name_the_field_never_the_value(auth: OAuth2 | AwsSigV4 | GoogleServiceAccount, text: str,
                                                          message: str) -> None:
    with pytest.raises(SecretError) as caught:
        parse_document(auth, text, "workspace 'w', credential 'api'")
    assert message in caught.value.message
    assert "cnry-doc-value" not in caught.value.message


SALES = """
    version = 1
    [credentials.sf]
    secret = "keyring"
    base_url = "https://acme.my.salesforce.com"
    [credentials.sf.auth.oauth2]
    token_url = "https://login.salesforce.com/services/oauth2/token"
    grant = "refresh_token"
    client_id = "abc"
"""


def test_secret_set_takes_a_document_on_stdin_and_checks_it_first(world: World) -> None:
    world.write_profile("sales", SALES)
    canary = world.canaries["acme"]
    missing = world.outloop("secret", "set", "--allow-plaintext", "sales", "sf", "--stdin",
                            stdin=f'client_secret = "{canary}"\n')
    assert missing.code == 2 and "no `refresh_token` field" in missing.err and "nothing was stored" in missing.err
    prompt = world.outloop("secret", "set", "--allow-plaintext", "sales", "sf")
    assert prompt.code == 2 and "pipe it in" in prompt.err
    document = f'refresh_token = "{canary}"\nclient_secret = "cs"\n'
    stored = world.outloop("secret", "set", "--allow-plaintext", "sales", "sf", "--stdin", stdin=document)
    assert stored.code == 0, stored.err
    assert json.loads(keyring_value(world, "sales", "sf") or "") == {"refresh_token": canary, "client_secret": "cs"}
    assert world.outloop("secret", "check", "sales").code == 0
    world.assert_no_canary()


def test_workspace_check_names_the_missing_field_of_a_stored_document(world: World) -> None:
    world.write_profile("sales", SALES)
    world.set_keyring("sales", "sf", f'client_secret = "{world.canaries["acme"]}"\n')
    result = world.outloop("workspace", "check", "sales")
    assert result.code == 1
    assert "credential 'sf'" in result.out and "no `refresh_token` field" in result.out
    shown = world.outloop("workspace", "show", "sales", "--json")
    credential = json.loads(shown.out)["credentials"]["sf"]
    assert credential["auth"]["oauth2"]["grant"] == "refresh_token" and credential["inject"] is None
    world.assert_no_canary()


def test_a_cmd_source_gives_its_whole_output_for_a_document(world: World) -> None:
    document = world.work / "sf.toml"
    document.write_text('refresh_token = "rt"\nclient_secret = "cs"\n')
    world.write_profile("sales", SALES.replace('secret = "keyring"', f'secret = "cmd:cat {document}"'))
    result = world.outloop("workspace", "check", "sales")
    assert result.code == 0, result.out
    document.write_text('client_secret = "cs"\nrefresh_token = ""\n')
    result = world.outloop("workspace", "check", "sales")
    assert result.code == 1 and "field `refresh_token` of the secret document must be a non-empty string" in result.out
