"""Helpers for egress-proxy tests: a test CA made with `cryptography`, HTTPS recording upstreams named
`localhost`, and a World whose acme profile reaches them through the proxy.

Three upstreams, all on 127.0.0.1 and told apart by port:
- `api`: a credential's host (`base_url = https://localhost:PORT`, the test CA passed by `ca_file`);
- `index`: listed in `[run] egress`, reached through a plain tunnel;
- `third`: in neither list; it must never receive a byte.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from ca_support import TestCA, make_test_ca
from conftest import World, make_world
from upstream import RecordingUpstream


def require_tool(name: str) -> None:
    """A client the proxy tests drive; `.ci/run` installs it, so in CI its absence is a failure, not a skip."""
    if shutil.which(name):
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{name} is not installed (CI must run the proxy's client tests: see .ci/run)")
    pytest.skip(f"{name} is not installed")


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
