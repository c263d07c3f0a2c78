"""The child's side of the egress proxy: which variables point its tools at outloop, and at the run's CA.

Tools disagree on names, so every spelling the common ones read is set (as the peers do, and a few more).
"""

from __future__ import annotations

from pathlib import Path

PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")
NO_PROXY_VARIABLES = ("NO_PROXY", "no_proxy")  # empty: loopback too goes through outloop, which serves it
CA_BUNDLE_VARIABLES = (
    "SSL_CERT_FILE",  # OpenSSL's default (Python ssl, curl built on OpenSSL, Ruby, many Go/Rust tools)
    "REQUESTS_CA_BUNDLE",  # requests
    "CURL_CA_BUNDLE",  # curl
    "NODE_EXTRA_CA_CERTS",  # node: added to its built-in roots
    "GIT_SSL_CAINFO",  # git over https
    "AWS_CA_BUNDLE",  # aws cli and SDKs
    "PIP_CERT",  # pip
    "CARGO_HTTP_CAINFO",  # cargo
    "BUNDLE_SSL_CA_CERT",  # bundler
    "npm_config_cafile",  # npm
    "DENO_CERT",  # deno
    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",  # gRPC's C core (Python, Ruby, PHP clients)
    "NIX_SSL_CERT_FILE",  # nix-built tools
)
# Node 22.21+ and 24.5+ route fetch and http(s) through HTTP(S)_PROXY when this is set; older Node ignores it.
NODE_PROXY_VARIABLES = {"NODE_USE_ENV_PROXY": "1"}


def proxy_environment(port: int, bundle: Path | None) -> dict[str, str]:
    url = f"http://127.0.0.1:{port}"
    env = dict.fromkeys(PROXY_VARIABLES, url)
    env.update(dict.fromkeys(NO_PROXY_VARIABLES, ""))
    env.update(NODE_PROXY_VARIABLES)
    if bundle is not None:
        env.update(dict.fromkeys(CA_BUNDLE_VARIABLES, str(bundle)))
    return env
