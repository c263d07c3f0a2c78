"""moto's S3 in server mode on 127.0.0.1, with IAM authentication on, so it checks every SigV4 signature.

moto lets the first INITIAL_NO_AUTH_ACTION_COUNT requests through unauthenticated: exactly the three IAM calls that
create the user, its access key and its policy. Every request after them must be signed with that key.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

BUCKET = "leads"
REGION = "us-east-1"
POLICY = '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}'
START_TIMEOUT = 30.0


@dataclass(frozen=True)
class MotoS3:
    url: str
    access_key_id: str
    secret_access_key: str

    def client(self, secret_access_key: str | None = None) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name=REGION, aws_access_key_id=self.access_key_id,
                            aws_secret_access_key=secret_access_key or self.secret_access_key)

    def document(self, secret_access_key: str | None = None) -> str:
        return (f'access_key_id = "{self.access_key_id}"\n'
                f'secret_access_key = "{secret_access_key or self.secret_access_key}"\n')


@contextmanager
def moto_s3() -> Iterator[MotoS3]:
    import boto3

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, process)
        iam = boto3.client("iam", endpoint_url=url, region_name=REGION, aws_access_key_id="AKIABOOTSTRAP",
                           aws_secret_access_key="bootstrap")
        iam.create_user(UserName="loop")
        key = iam.create_access_key(UserName="loop")["AccessKey"]
        iam.put_user_policy(UserName="loop", PolicyName="s3", PolicyDocument=POLICY)
        s3 = MotoS3(url, key["AccessKeyId"], key["SecretAccessKey"])
        s3.client().create_bucket(Bucket=BUCKET)
        yield s3
    finally:
        process.terminate()
        process.wait(timeout=10)


def _wait_until_up(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            return
        except (urllib.error.URLError, ConnectionError):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto's server did not start") from None
            time.sleep(0.05)  # polling a condition: the server is up or it is not
