"""`make demo`: a real loop through outloop against a local fake CRM, ending in the run's audit summary.

Everything lives in .demo/ (its own OUTLOOP_HOME), so the demo never touches your real profiles or keyring.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".demo"
PROFILE = """\
# Written by examples/demo.py: the acme profile of profiles/acme.toml, pointed at the local fake CRM.
version = 1
description = "Acme Corp: nightly CRM lead sync (demo against a local fake CRM)"

[run]
timeout = "2m"
max_requests = 100
env_set = {{ LOOP_CLIENT = "acme" }}

[credentials.crm]
secret = "env:DEMO_ACME_CRM_TOKEN"
base_url = "http://127.0.0.1:{port}"
inject = {{ header = "Authorization", value = "Bearer {{secret}}" }}
allow = [
    "GET /crm/v3/objects/contacts",
    "GET /crm/v3/objects/contacts/*",
    "PATCH /crm/v3/objects/contacts/*",
]
deny = ["* /crm/v3/objects/contacts/*/merge"]
rate = "20/s"
"""


def main() -> int:
    shutil.rmtree(DEMO, ignore_errors=True)
    (DEMO / "profiles").mkdir(parents=True)
    token = "demo-" + secrets.token_hex(16)
    crm = subprocess.Popen([sys.executable, str(ROOT / "examples" / "fake_crm.py"), token],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert crm.stdout is not None
        port = int(crm.stdout.readline())
        (DEMO / "profiles" / "acme.toml").write_text(PROFILE.format(port=port))
        env = {**os.environ, "OUTLOOP_HOME": str(DEMO), "DEMO_ACME_CRM_TOKEN": token}
        outloop = str(Path(sys.executable).parent / "outloop")
        # The loop's working dir is the one place it may write: examples/, not the checkout (which holds .demo).
        print(f"$ cd examples && outloop run -w acme -- python loop.py    (fake CRM on 127.0.0.1:{port})\n",
              flush=True)
        completed = subprocess.run([outloop, "run", "-w", "acme", "--", sys.executable, "loop.py"], env=env,
                                   cwd=ROOT / "examples", check=False)
        return completed.returncode
    finally:
        crm.terminate()
        crm.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
