"""AWS SigV4 credentials against moto's S3 server, which recomputes every signature with the user's key.

The broker signs after policy and before forwarding; the child holds no key, and what it sends to sign with is
dropped or refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from auth_support import write_auth_profile
from aws_support import BUCKET, REGION, MotoS3, moto_s3
from conftest import World
from sandbox_support import require_layer

UNIX_CONNECTION = """
import http.client, os, socket
class Conn(http.client.HTTPConnection):
    def __init__(self):
        super().__init__("localhost")
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(os.environ["OUTLOOP_SOCKET"])
"""


@pytest.fixture(scope="module")
def s3() -> Iterator[MotoS3]:
    with moto_s3() as server:
        yield server


def _profile(world: World, s3: MotoS3, *, secret_access_key: str | None = None) -> None:
    write_auth_profile(world, "data", "s3", f"{s3.url}/{BUCKET}",
                       f'{{ aws_sigv4 = {{ service = "s3", region = "{REGION}" }} }}')
    world.set_keyring("data", "s3", s3.document(secret_access_key))
    world.canaries["secret_access_key"] = s3.secret_access_key


def test_a_get_is_signed_and_verified(world: World, s3: MotoS3) -> None:
    _profile(world, s3)
    s3.client().put_object(Bucket=BUCKET, Key="in/a.csv", Body=b"name,email\nAda,ada@example.com\n")
    result = world.run_loop("""
        from outloop_cli.client import Outloop
        response = Outloop().request("s3", "GET", "/in/a.csv")
        print(response.status, response.body.decode())
    """, workspace="data")
    assert result.code == 0, result.err
    assert result.out.startswith("200 name,email\nAda")
    world.assert_no_canary(result.out, result.err)


def test_a_put_with_a_body_is_signed_with_its_payload_hash(world: World, s3: MotoS3) -> None:
    _profile(world, s3)
    result = world.run_loop("""
        from outloop_cli.client import Outloop
        print(Outloop().request("s3", "PUT", "/out/b.csv", body=b"id\\n1\\n2\\n").status)
    """, workspace="data")
    assert result.out.strip() == "200", result.err
    assert s3.client().get_object(Bucket=BUCKET, Key="out/b.csv")["Body"].read() == b"id\n1\n2\n"


def test_a_chunked_upload_is_signed_and_verified(world: World, s3: MotoS3) -> None:
    _profile(world, s3)
    result = world.run_loop(UNIX_CONNECTION + """
conn = Conn()
conn.request("PUT", "/v1/http/s3/out/chunked.bin", body=iter([b"part-1;", b"part-2;", b"part-3"]),
             encode_chunked=True)
response = conn.getresponse()
print(response.status, response.read()[:200])
""", workspace="data")
    assert result.out.startswith("200"), result.out + result.err
    stored = s3.client().get_object(Bucket=BUCKET, Key="out/chunked.bin")["Body"].read()
    assert stored == b"part-1;part-2;part-3"


def test_a_large_upload_streams_as_unsigned_payload_and_is_verified(world: World, s3: MotoS3) -> None:
    _profile(world, s3)
    result = world.run_loop("""
        from outloop_cli.client import Outloop
        body = bytes(range(256)) * (9 * 4096)  # 9 MiB: more than the broker holds to hash
        print(Outloop().request("s3", "PUT", "/out/big.bin", body=body).status)
    """, workspace="data", timeout=120)
    assert result.out.strip() == "200", result.err
    head = s3.client().head_object(Bucket=BUCKET, Key="out/big.bin")
    assert head["ContentLength"] == 9 * 1024 * 1024


def test_the_childs_own_signing_headers_are_dropped(world: World, s3: MotoS3) -> None:
    _profile(world, s3)
    s3.client().put_object(Bucket=BUCKET, Key="in/c.csv", Body=b"c")
    # Forwarded, a stale X-Amz-Date or a session token of the child's would make the signature fail or change
    # whose key is used; the broker's signature must be the only one.
    result = world.run_loop("""
        from outloop_cli.client import Outloop
        headers = {"Authorization": "AWS4-HMAC-SHA256 Credential=AKIACHILD/20000101/us-east-1/s3/aws4_request, "
                   "SignedHeaders=host, Signature=00", "X-Amz-Date": "20000101T000000Z",
                   "X-Amz-Security-Token": "child-token", "X-Amz-Content-Sha256": "UNSIGNED-PAYLOAD"}
        print(Outloop().request("s3", "GET", "/in/c.csv", headers=headers).status)
    """, workspace="data")
    assert result.out.strip() == "200", result.err


def test_a_wrong_key_fails_moto_verification(world: World, s3: MotoS3) -> None:
    # Positive control: moto really checks what the broker signs.
    _profile(world, s3, secret_access_key="not-the-key-moto-knows")
    result = world.run_loop("""
        from outloop_cli.client import Outloop
        response = Outloop().request("s3", "GET", "/in/a.csv")
        print(response.status, response.body.decode())
    """, workspace="data")
    assert result.out.startswith("403") and "SignatureDoesNotMatch" in result.out


def test_presigned_urls_are_refused_before_anything_goes_upstream(world: World, s3: MotoS3) -> None:
    _profile(world, s3)
    result = world.run_loop("""
        from outloop_cli.client import Outloop
        query = ("X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAX%2F20240101%2Fus-east-1%2Fs3%2F"
                 "aws4_request&X-Amz-Date=20240101T000000Z&X-Amz-Expires=60&X-Amz-SignedHeaders=host"
                 "&X-Amz-Signature=abcd")
        response = Outloop().request("s3", "GET", "/in/a.csv?" + query)
        print(response.status, response.body.decode())
    """, workspace="data")
    status, body = result.out.split(" ", 1)
    assert status == "400" and "presigned URLs carry their own signature" in body
    (event,) = world.events()
    assert event["decision"] == "deny" and event["reason"] == "bad_query"
    assert json.loads(body)  # the broker's own JSON error, not S3's XML


def test_an_unmodified_boto3_in_base_url_mode_works_with_no_key(world: World, s3: MotoS3) -> None:
    # The SDK signs with a dummy key and carries the run token as its session token (the loopback listener's
    # authentication); the broker drops both and signs with the workspace's key.
    world.write_profile("data", f"""
        version = 1
        [run]
        env_keep = ["PATH", "HOME", "LANG"]
        [credentials.s3]
        secret = "keyring"
        base_url = "{s3.url}"
        auth = {{ aws_sigv4 = {{ service = "s3", region = "{REGION}" }} }}
        allow = ["* /{BUCKET}", "* /{BUCKET}/**"]
        [credentials.s3.child_env]
        AWS_ENDPOINT_URL_S3 = "{{url}}"
        AWS_ACCESS_KEY_ID = "outloop"
        AWS_SECRET_ACCESS_KEY = "outloop"
        AWS_SESSION_TOKEN = "{{token}}"
        AWS_DEFAULT_REGION = "{REGION}"
    """)
    world.set_keyring("data", "s3", s3.document())
    world.canaries["secret_access_key"] = s3.secret_access_key
    result = world.run_loop(f"""
        import boto3
        s3 = boto3.client("s3")
        s3.put_object(Bucket="{BUCKET}", Key="sdk/d.txt", Body=b"from boto3")
        print(s3.get_object(Bucket="{BUCKET}", Key="sdk/d.txt")["Body"].read().decode())
        print(sorted(item["Key"] for item in s3.list_objects_v2(Bucket="{BUCKET}", Prefix="sdk/")["Contents"]))
    """, workspace="data")
    assert result.code == 0, result.err
    assert result.out.splitlines() == ["from boto3", "['sdk/d.txt']"]
    world.assert_no_canary(result.out, result.err)


def test_an_unmodified_boto3_through_the_egress_proxy_is_signed_for_the_final_host_and_path(world: World,
                                                                                           s3: MotoS3) -> None:
    """An SDK that keeps its real endpoint and sends through HTTP_PROXY: the broker drops the SDK's dummy
    signature and signs the URL it forwards to (host and path as moto sees them), as on /v1/http/."""
    require_layer("network_isolation")  # the proxy is on where the network is isolated
    _profile(world, s3)
    s3.client().put_object(Bucket=BUCKET, Key="in/p.csv", Body=b"via the proxy")
    result = world.run_loop(f"""
        import boto3
        client = boto3.client("s3", endpoint_url={s3.url!r}, region_name="{REGION}", aws_access_key_id="outloop",
                              aws_secret_access_key="outloop")
        print(client.get_object(Bucket="{BUCKET}", Key="in/p.csv")["Body"].read().decode())
        client.put_object(Bucket="{BUCKET}", Key="out/p.csv", Body=b"written through the proxy")
        print("put")
    """, workspace="data")
    assert result.code == 0, result.err
    assert result.out.splitlines()[-2:] == ["via the proxy", "put"]
    assert s3.client().get_object(Bucket=BUCKET, Key="out/p.csv")["Body"].read() == b"written through the proxy"
    assert [(e["method"], e["path"], e["decision"]) for e in world.events()] == [
        ("GET", "/in/p.csv", "allow"), ("PUT", "/out/p.csv", "allow")]
    world.assert_no_canary(result.out, result.err)
