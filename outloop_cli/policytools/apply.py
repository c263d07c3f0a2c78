"""`policy suggest --apply`: add allow rules to a profile, keeping the user's comments and layout (tomlkit).

Only credentials defined in the workspace's own file are edited: adding a rule to an inherited credential would
mean copying the whole credential, or changing the base every other client extends.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import tomlkit
from tomlkit.items import Array, Table

from outloop_cli.errors import OutloopError, ProfileError
from outloop_cli.profiles import Profile, load_profile


def apply_rules(profile: Profile, rules: Mapping[str, Sequence[str]], dirs: Sequence[Path]) -> dict[str, list[str]]:
    """Append each credential's new rules to its `allow` list in the profile's own file; returns what was added.

    The edited profile is loaded before this returns; if it does not load, the file is put back as it was.
    """
    path = profile.path
    original = path.read_text(encoding="utf-8")
    document = tomlkit.parse(original)
    added: dict[str, list[str]] = {}
    for name, texts in rules.items():
        credential = profile.credentials[name]
        if credential.owner != profile.workspace:
            raise ProfileError(f"credential {name!r} is inherited from workspace {credential.owner!r}; add its rules "
                               f"to {credential.owner}.toml by hand (they would apply to every workspace that "
                               "extends it)")
        table = document["credentials"][name]
        assert isinstance(table, Table | dict)
        allow = table.get("allow")
        if allow is None:
            allow = tomlkit.array()
            allow.multiline(True)
            table["allow"] = allow
        assert isinstance(allow, Array)
        new = [text for text in texts if text not in allow]
        for text in new:
            allow.append(text)
        if new:
            added[name] = new
    if not added:
        return added
    _replace(path, tomlkit.dumps(document))
    try:
        load_profile(profile.workspace, dirs)
    except ProfileError as exc:
        _replace(path, original)
        raise ProfileError(f"{path}: the edited profile does not load, so it was left as it was: {exc.message}") \
            from None
    return added


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.outloop-tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutloopError(f"cannot write {path}: {exc.strerror}") from None
