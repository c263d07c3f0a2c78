"""The resolved policy a run was judged by, and its hash: what `policy replay` and the run record compare.

The hash covers what decides requests (rules, limits, guard settings), not descriptions or secret sources, so
editing a comment-like field does not look like a policy change.
"""

from __future__ import annotations

import hashlib
import json

from outloop_cli.profiles import Profile


def resolved_policy(profile: Profile) -> dict[str, object]:
    return {
        "max_requests": profile.run.max_requests,
        "guard": {"responses": profile.guard.responses, "max_body": profile.guard.max_body},
        "credentials": {
            name: {
                "base_url": cred.base_url,
                "allow": [rule.text for rule in cred.allow],
                "deny": [rule.text for rule in cred.deny],
                "rate": str(cred.rate) if cred.rate else None,
                "max_requests": cred.max_requests,
                "reveal": cred.reveal,
            }
            for name, cred in sorted(profile.credentials.items())
        },
    }


def policy_hash(profile: Profile) -> str:
    text = json.dumps(resolved_policy(profile), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
