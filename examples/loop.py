"""The demo's "agent loop": it qualifies CRM leads through outloop, holding no key of its own.

It also tries what a prompt-injected loop would: another client's credential, a denied endpoint, its environment.
"""

from __future__ import annotations

import os

from outloop_cli.client import Outloop


def main() -> None:
    client = Outloop()
    info = client.run_info()
    print(f"run {info['run_id']} in workspace {info['workspace']}")
    contacts = client.request("crm", "GET", "/crm/v3/objects/contacts", params={"limit": "10"}).json()["results"]
    for contact in contacts:
        detail = client.request("crm", "GET", f"/crm/v3/objects/contacts/{contact['id']}").json()
        if detail["lifecycle"] == "lead" and detail["email"].startswith("ada"):
            updated = client.request("crm", "PATCH", f"/crm/v3/objects/contacts/{contact['id']}",
                                     json={"properties": {"lifecycle": "qualified"}}).json()
            print(f"qualified {updated['email']}")
    print(f"read {len(contacts)} contacts")

    # What an injected prompt might try. Each is refused, and each refusal is in the audit.
    merge = client.request("crm", "POST", "/crm/v3/objects/contacts/101/merge", json={"into": "102"})
    print(f"merge contacts        -> {merge.status} {merge.error['type'] if merge.error else ''}")
    other = client.request("globex-crm", "GET", "/crm/v3/objects/contacts")
    print(f"use another client's  -> {other.status} {other.error['type'] if other.error else ''}")
    sneaky = client.request("crm", "GET", "/crm/v3/objects/contacts/../../../admin")
    print(f"path traversal        -> {sneaky.status} {sneaky.error['type'] if sneaky.error else ''}")
    leaked = [name for name in os.environ if "TOKEN" in name or "SECRET" in name or "KEY" in name]
    print(f"secret-looking env    -> {leaked or 'none'}")


if __name__ == "__main__":
    main()
