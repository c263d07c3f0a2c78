"""A profile author's mistake: a secret put within the child's reach by the profile itself.

Each must stop the run with exit 125 before the child starts, naming the variable and the credential, never the
value. Mistakes the schema already refuses (user info in base_url, plain http to a remote host, env_keep passing
an `env:` source) are covered in tests/test_profiles.py and named in THREATS.md.
"""

from __future__ import annotations

import pytest
from conftest import World

from adversarial.conftest import run_hostile

CRM = """
    [credentials.crm]
    secret = "keyring"
    base_url = "{UPSTREAM}"
    allow = ["GET /**"]
"""
MISTAKES = {
    "key pasted into env_set": ("[run]\nenv_set = { CRM_KEY = \"%(acme)s\" }\n" + CRM, {}, "CRM_KEY"),
    "key pasted inside a longer env_set value": (
        "[run]\nenv_set = { CRM_URL = \"https://u:%(acme)s@crm.example\" }\n" + CRM, {}, "CRM_URL"),
    "env_keep passes a variable holding a keyring secret": (
        "[run]\nenv_keep = [\"PATH\", \"OPERATOR_*\"]\n" + CRM, {"OPERATOR_CRM_KEY": "%(acme)s"},
        "OPERATOR_CRM_KEY"),
    "env_keep passes the agency's key from the operator's environment": (
        "extends = \"agency\"\n[run]\nenv_keep = [\"*\"]\n" + CRM, {"LLM_KEY": "%(agency)s"}, "LLM_KEY"),
    "key pasted into child_env": (
        CRM + "child_env = { CRM_TOKEN = \"%(acme)s\", CRM_URL = \"{url}\" }\n", {}, "CRM_TOKEN"),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_secret_within_the_childs_reach_stops_the_run_before_it_starts(world: World, mistake: str) -> None:
    profile, extra_env, variable = MISTAKES[mistake]
    world.write_profile("acme", "version = 1\n" + profile % world.canaries)
    world.extra_env.update({name: value % world.canaries for name, value in extra_env.items()})
    marker = world.work / "child-ran"
    result = run_hostile(world, f"open({str(marker)!r}, 'w').close()")
    assert result.code == 125, result.combined
    assert variable in result.err and "would hold the secret of credential" in result.err
    assert not marker.exists()
