"""The per-run broker: a local HTTP server that checks policy, injects secrets and audits every call."""
