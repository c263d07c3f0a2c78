"""`outloop workspace show`: the resolved profile as the TOML its author wrote, inheritance marked.

Values come from the files themselves (so "2h" stays "2h", an inject table stays the table written), merged the
way profiles.py merges them; a key that comes from a base file carries a trailing `# from <base>` comment.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import tomli_w

from outloop_cli.profiles import RUN_KEYS, Profile, read_toml
from outloop_cli.secret_admin import SecretStatus

_WIDTH = 100
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_MERGED_RUN_KEYS = {"env_set": "table", "hide": "list"}  # how profiles._parse_run combines a base and its child


def render_profile(profile: Profile, statuses: Sequence[SecretStatus]) -> str:
    files = [(path.stem, read_toml(path)) for path in profile.sources]  # nearest first
    chain = " -> ".join(str(path) for path in profile.sources)
    lines = [f"# workspace {profile.workspace}: {chain}"]
    own = files[0][1]
    for key in ("version", "description", "extends", "abstract"):
        if key in own:
            lines.append(_line(key, own[key]))
    run = _merged_run(profile.workspace, files)
    if run:
        lines += ["", "[run]", *(_line(key, value, origin) for key, (value, origin) in run.items())]
    raw_credentials = {name: table for _, raw in reversed(files)
                       for name, table in raw.get("credentials", {}).items()}
    by_name = {status.credential: status for status in statuses}
    for name, credential in sorted(profile.credentials.items()):
        header = f"[credentials.{_key(name)}]"
        lines += ["", header if credential.owner == profile.workspace else f"{header}  # from {credential.owner}"]
        for key, value in raw_credentials[name].items():
            status = by_name.get(name)
            lines.append(_line(key, value, status.state if key == "secret" and status else None))
    if any(status.problem for status in statuses):
        lines += ["", f"# `outloop secret check {profile.workspace}` says what each secret that is not present needs"]
    return "\n".join(lines) + "\n"


def _merged_run(workspace: str, files: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, tuple[Any, str | None]]:
    """Each [run] key with its resolved value and, when not (only) this file's, where it came from."""
    values: dict[str, Any] = {}
    origins: dict[str, list[str]] = {}
    for name, raw in reversed(files):  # the furthest base first, so nearer files win
        for key, value in raw.get("run", {}).items():
            kind = _MERGED_RUN_KEYS.get(key)
            if kind == "table" and key in values:
                values[key] = {**values[key], **value}
                origins[key].append(name)
            elif kind == "list" and key in values:
                values[key] = [*values[key], *value]
                origins[key].append(name)
            else:
                values[key], origins[key] = value, [name]
    ordered = [key for key in RUN_KEYS if key in values]
    return {key: (values[key], None if origins[key] == [workspace] else "from " + " + ".join(origins[key]))
            for key in ordered}


def _line(key: str, value: Any, comment: str | None = None) -> str:
    text = f"{_key(key)} = {_value(value)}"
    if isinstance(value, list) and len(text) > _WIDTH:  # one item a line, as long rule lists are written
        text = f"{_key(key)} = [\n" + "".join(f"    {_value(item)},\n" for item in value) + "]"
    return f"{text}  # {comment}" if comment else text


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _value(key)


def _value(value: Any) -> str:
    """One TOML value on one line: tables inline, as profiles are written."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    return tomli_w.dumps({"v": value}).partition(" = ")[2].strip()
