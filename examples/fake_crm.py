"""A local stand-in for a CRM API (HubSpot-like), so `make demo` shows a real run without the internet.

It accepts only the bearer token it was started with, which proves the broker injected it: the loop never had it.
Run: python examples/fake_crm.py TOKEN  (prints its port on the first line, serves until killed)
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CONTACTS = {
    "101": {"id": "101", "email": "ada@acme.example", "lifecycle": "lead"},
    "102": {"id": "102", "email": "grace@acme.example", "lifecycle": "lead"},
    "103": {"id": "103", "email": "linus@acme.example", "lifecycle": "customer"},
}


class CrmHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    token = ""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _reply(self, status: int, payload: object) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorised(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {self.token}":
            return True
        self._reply(401, {"message": "missing or wrong token"})
        return False

    def do_GET(self) -> None:
        if not self._authorised():
            return
        path = self.path.split("?")[0]
        if path == "/crm/v3/objects/contacts":
            self._reply(200, {"results": list(CONTACTS.values())})
        elif path.startswith("/crm/v3/objects/contacts/") and path.rsplit("/", 1)[1] in CONTACTS:
            self._reply(200, CONTACTS[path.rsplit("/", 1)[1]])
        else:
            self._reply(404, {"message": "not found"})

    def do_PATCH(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        update = json.loads(self.rfile.read(length) or b"{}")
        if not self._authorised():
            return
        contact_id = self.path.rsplit("/", 1)[1]
        if contact_id not in CONTACTS:
            self._reply(404, {"message": "not found"})
            return
        CONTACTS[contact_id].update(update.get("properties", {}))
        self._reply(200, CONTACTS[contact_id])

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        self.rfile.read(length)
        if self._authorised():
            self._reply(200, {"merged": True})  # the profile's deny rule means this is never reached


def main() -> None:
    CrmHandler.token = sys.argv[1]
    server = ThreadingHTTPServer(("127.0.0.1", 0), CrmHandler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
