"""The hostile-loop suite: each test attacks a real `outloop run` the way docs/THREATS.md says an attacker would."""
