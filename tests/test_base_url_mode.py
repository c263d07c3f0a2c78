"""Base-URL mode: unmodified SDKs configured only by environment variables, with the network isolated or not."""

from __future__ import annotations

import json

import pytest
from conftest import World
from sandbox_support import require_layer

OPENAI_PROFILE = """
    version = 1
    [credentials.openai]
    secret = "keyring"
    base_url = "{UPSTREAM}/v1"
    inject = { header = "Authorization", value = "Bearer {secret}" }
    allow = ["POST /chat/completions", "GET /models"]
    child_env = { OPENAI_BASE_URL = "{url}", OPENAI_API_KEY = "{token}" }
"""

SDK_LOOP = """
    import json, os
    import openai
    client = openai.OpenAI(max_retries=0)  # configured only by OPENAI_BASE_URL and OPENAI_API_KEY
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    print(json.dumps({"status": raw.status_code, "key": os.environ["OPENAI_API_KEY"],
                      "base": os.environ["OPENAI_BASE_URL"], "env": dict(os.environ)}))
"""


@pytest.fixture
def openai_world(world: World) -> World:
    world.write_profile("acme", OPENAI_PROFILE)
    world.set_keyring("acme", "openai", world.canaries["acme"])
    return world


@pytest.mark.parametrize("network", ["auto", "open"])
def test_openai_sdk_configured_by_env_reaches_upstream_with_the_real_secret(
    openai_world: World, network: str
) -> None:
    if network == "auto":
        require_layer("network_isolation")
    result = openai_world.run_loop(SDK_LOOP, flags=["--network", network])
    assert result.code == 0, result.combined
    seen = json.loads(result.out)
    assert seen["status"] == 200
    assert seen["key"].startswith("outloop-")
    assert seen["base"].endswith("/v1/http/openai")
    assert seen["env"]["OUTLOOP_TOKEN"] == seen["key"]
    (request,) = openai_world.upstream.requests
    assert request.path == "/v1/chat/completions"
    assert request.header("Authorization") == f"Bearer {openai_world.canaries['acme']}"
    assert seen["key"].encode() not in request.raw  # the placeholder never goes upstream
    openai_world.assert_no_canary(result.out, result.err)


TOKEN_LOOP = """
    import json, os, urllib.request, urllib.error
    def call(token):
        request = urllib.request.Request(os.environ["OPENAI_BASE_URL"] + "/models")
        if token is not None:
            request.add_header("Authorization", "Bearer " + token)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
    print(json.dumps([call(os.environ["OUTLOOP_TOKEN"]), call(None), call("outloop-wrong"),
                      call(os.environ["OUTLOOP_TOKEN"] + "x")]))
"""


def test_wrong_or_missing_token_gets_401_and_is_audited(openai_world: World) -> None:
    result = openai_world.run_loop(TOKEN_LOOP)
    assert json.loads(result.out) == [200, 401, 401, 401], result.combined
    denied = [event for event in openai_world.events() if event["decision"] == "deny"]
    assert [event["reason"] for event in denied] == ["bad_token"] * 3


def test_token_from_another_run_is_useless(openai_world: World) -> None:
    first = openai_world.run_loop("import os; print(os.environ['OUTLOOP_TOKEN'])")
    old_token = first.out.strip()
    replay = openai_world.run_loop(TOKEN_LOOP.replace('call(os.environ["OUTLOOP_TOKEN"]), ', f'call("{old_token}"), '))
    assert json.loads(replay.out)[0] == 401


SDK_PROFILE = """
    version = 1
    [credentials.openai]
    secret = "keyring"
    base_url = "{UPSTREAM}/v1"
    allow = ["POST /chat/completions"]
    child_env = { OPENAI_BASE_URL = "{url}", OPENAI_API_KEY = "{token}" }

    [credentials.anthropic]
    secret = "keyring"
    base_url = "{UPSTREAM}"
    inject = { header = "x-api-key", value = "{secret}" }
    allow = ["GET /v1/models"]
    deny = ["POST /v1/messages"]
    child_env = { ANTHROPIC_BASE_URL = "{url}", ANTHROPIC_API_KEY = "{token}" }
"""

SDK_REFUSAL_LOOP = """
    import json
    import anthropic, openai
    seen = {}
    try:
        openai.OpenAI(max_retries=0).embeddings.create(model="e", input="hi")
    except openai.PermissionDeniedError as exc:
        seen["openai"] = {"text": str(exc), "type": exc.type, "body": exc.body}
    try:
        anthropic.Anthropic(max_retries=0).messages.create(
            model="m", max_tokens=1, messages=[{"role": "user", "content": "hi"}])
    except anthropic.PermissionDeniedError as exc:
        seen["anthropic"] = {"text": str(exc), "type": None, "body": exc.body}
    print(json.dumps(seen))
"""


def test_sdks_surface_the_brokers_refusal_message_in_their_exceptions(world: World) -> None:
    world.write_profile("acme", SDK_PROFILE)
    world.set_keyrings([("acme", "openai", world.canaries["acme"]), ("acme", "anthropic", world.canaries["acme"])])
    result = world.run_loop(SDK_REFUSAL_LOOP)
    assert result.code == 0, result.combined
    seen = json.loads(result.out)
    openai_error, anthropic_error = seen["openai"], seen["anthropic"]
    assert "POST /embeddings is not allowed for 'openai' (no allow rule matches)" in openai_error["text"]
    assert openai_error["type"] == "denied"
    assert openai_error["body"]["reason"] == "no_matching_rule"
    assert "POST /v1/messages is not allowed for 'anthropic' (denied by rule 'POST /v1/messages')" \
        in anthropic_error["text"]
    assert world.upstream.requests == []
    world.assert_no_canary(result.out, result.err)


def test_refusal_names_its_reason_in_a_header_and_the_nested_error_body(world: World) -> None:
    loop = """
        import json, os, urllib.request, urllib.error
        request = urllib.request.Request(os.environ["ANTHROPIC_BASE_URL"] + "/v1/messages", method="POST",
                                         headers={"x-api-key": os.environ["OUTLOOP_TOKEN"]})
        try:
            urllib.request.urlopen(request, timeout=10)
        except urllib.error.HTTPError as exc:
            print(json.dumps({"status": exc.code, "decision": exc.headers["Outloop-Decision"],
                              "reason": exc.headers["Outloop-Reason"], "body": json.loads(exc.read())}))
    """
    world.write_profile("acme", SDK_PROFILE)
    world.set_keyrings([("acme", "openai", world.canaries["acme"]), ("acme", "anthropic", world.canaries["acme"])])
    result = world.run_loop(loop)
    assert result.code == 0, result.combined
    assert json.loads(result.out) == {
        "status": 403, "decision": "deny", "reason": "denied_by_rule",
        "body": {"error": {"type": "denied", "reason": "denied_by_rule",
                           "message": "POST /v1/messages is not allowed for 'anthropic' "
                                      "(denied by rule 'POST /v1/messages')",
                           "credential": "anthropic", "rule": "POST /v1/messages"}}}
