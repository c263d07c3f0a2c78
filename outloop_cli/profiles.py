"""Load and validate workspace profiles (schema version 1) into frozen dataclasses.

Every error names the file, the key and the fix, because a typo in a profile must stop a run before the child starts.
"""

from __future__ import annotations

import difflib
import fnmatch
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from outloop_cli.auth.config import AuthConfig, parse_auth
from outloop_cli.broker.egress import EgressError, EgressRule, parse_egress_rule
from outloop_cli.errors import ProfileError
from outloop_cli.modes import NetworkMode
from outloop_cli.policy import STANDARD_METHODS, Rule, RuleError, parse_rule
from outloop_cli.units import Rate, parse_duration, parse_rate, parse_size

SCHEMA_VERSION = 1
WORKSPACE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
CREDENTIAL_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
CUSTOM_METHOD = re.compile(r"[A-Z][A-Z_-]{0,31}")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ENV_GLOB = re.compile(r"[A-Za-z0-9_*?]+")
FILESYSTEM_MODES = ("workspace", "host")
DEFAULT_ENV_KEEP = ("PATH", "HOME", "LANG", "LC_*", "TZ", "TERM")
DEFAULT_INJECT_HEADER = "Authorization"
DEFAULT_INJECT_VALUE = "Bearer {secret}"
CHILD_ENV_PLACEHOLDERS = ("{url}", "{token}")

FilesystemMode = Literal["workspace", "host"]


TOP_KEYS = ("version", "description", "extends", "abstract", "run", "notify", "credentials", "tags", "guard")
NOTIFY_KEYS = ("on", "command")
NOTIFY_CONDITIONS = ("failure", "denied", "errors")
RUN_KEYS = ("timeout", "max_requests", "env_keep", "env_set", "network", "hide", "memory", "processes",
            "cpu_seconds", "filesystem", "read", "write", "egress", "proxy")
CREDENTIAL_KEYS = ("secret", "base_url", "inject", "allow", "deny", "rate", "max_requests", "reveal",
                   "child_env", "description", "connect_timeout", "read_timeout", "custom_methods",
                   "auth", "ca_file")
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 120.0  # longest silence between upstream bytes; LLM streams pause while "thinking"
INJECT_KEYS = ("header", "value", "query", "basic")
GUARD_KEYS = ("identifiers", "responses", "max_body")
GUARD_RESPONSES = ("flag", "deny")
DEFAULT_GUARD_MAX_BODY = 4 * 1024 * 1024
# Shorter identifiers would match inside ordinary words and ids, refusing the workspace's own traffic.
MIN_IDENTIFIER_LENGTH = 3


@dataclass(frozen=True)
class Injection:
    """How the secret reaches the upstream: a header, a query parameter, or HTTP basic auth."""

    style: Literal["header", "query", "basic"]
    name: str  # header name, query parameter name, or basic-auth user name
    template: str = "{secret}"  # only for headers: e.g. "Bearer {secret}"


@dataclass(frozen=True)
class Credential:
    name: str
    owner: str  # the workspace whose profile defined it; its keyring entry lives under outloop/<owner>
    secret_ref: str
    base_url: str
    inject: Injection
    allow: tuple[Rule, ...]
    deny: tuple[Rule, ...]
    rate: Rate | None = None
    max_requests: int | None = None
    reveal: bool = False
    child_env: Mapping[str, str] = field(default_factory=dict)
    description: str = ""
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    auth: AuthConfig | None = None  # set: the broker mints or signs each request instead of injecting `secret`
    ca_file: str | None = None  # extra roots for a private upstream, on top of the system's

    @property
    def host(self) -> str:
        return urlsplit(self.base_url).netloc


@dataclass(frozen=True)
class RunSettings:
    timeout: float | None = None
    max_requests: int | None = None
    env_keep: tuple[str, ...] = DEFAULT_ENV_KEEP
    env_set: Mapping[str, str] = field(default_factory=dict)
    network: NetworkMode = NetworkMode.AUTO
    hide: tuple[str, ...] = ()
    memory: int | None = None
    processes: int | None = None
    cpu_seconds: int | None = None
    filesystem: FilesystemMode = "workspace"
    read: tuple[str, ...] = ()  # extra read-only paths of the workspace view
    write: tuple[str, ...] = ()  # extra read-write paths of the workspace view
    egress: tuple[EgressRule, ...] = ()
    proxy: bool | None = None  # None: on when the child's network is isolated


@dataclass(frozen=True)
class GuardSettings:
    """`[guard]`: this client's identifiers (never inherited: they name one client's data) and how this
    workspace's own runs treat other clients' identifiers (inherited like `[run]`)."""

    identifiers: tuple[str, ...] = ()
    responses: Literal["flag", "deny"] = "flag"
    max_body: int = DEFAULT_GUARD_MAX_BODY


@dataclass(frozen=True)
class NotifySettings:
    """`[notify]`: which run outcomes call `command` (with the summary JSON on stdin), see notify.py."""

    on: tuple[str, ...]
    command: tuple[str, ...]


@dataclass(frozen=True)
class Profile:
    workspace: str
    path: Path
    description: str
    extends: str | None
    run: RunSettings
    credentials: Mapping[str, Credential]
    sources: tuple[Path, ...]  # this file and every file it extends, nearest first
    tags: tuple[str, ...] = ()  # this file's own, for `run --each @TAG`; not inherited
    guard: GuardSettings = GuardSettings()
    abstract: bool = False  # a base for `extends`, never run itself; not inherited by the profiles extending it
    notify: NotifySettings | None = None  # inherited whole from the base when this file has no [notify]


def check_workspace_name(name: str) -> str:
    if not WORKSPACE_NAME.fullmatch(name):
        raise ProfileError(
            f"{name!r} is not a valid workspace name: use lower-case letters, digits, '-' and '_' "
            "(at most 63, starting with a letter or digit)"
        )
    return name


def find_profile(workspace: str, dirs: Sequence[Path]) -> Path:
    """The first `<workspace>.toml` along the lookup path."""
    check_workspace_name(workspace)
    for directory in dirs:
        candidate = directory / f"{workspace}.toml"
        if candidate.is_file():
            return candidate
    known = sorted(available_workspaces(dirs))
    hint = f" Known workspaces: {', '.join(known)}." if known else " No profiles were found there."
    searched = ", ".join(str(d) for d in dirs)
    raise ProfileError(
        f"unknown workspace {workspace!r}: no {workspace}.toml in {searched}.{hint} "
        f"Create it with `outloop workspace new {workspace}` or point --profiles / OUTLOOP_PROFILES at it."
    )


def available_workspaces(dirs: Sequence[Path]) -> dict[str, Path]:
    """Workspace name -> file, earlier directories shadowing later ones."""
    found: dict[str, Path] = {}
    for directory in dirs:
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.toml")):
            if WORKSPACE_NAME.fullmatch(path.stem) and path.is_file():  # as find_profile sees it
                found.setdefault(path.stem, path)
    return found


def runnable_workspaces(dirs: Sequence[Path]) -> dict[str, Path]:
    """available_workspaces without the `abstract = true` bases, for lists and completion. A file that does not
    parse stays in, so its error is seen where the user looks."""
    found = {}
    for name, path in available_workspaces(dirs).items():
        try:
            abstract = read_toml(path).get("abstract") is True
        except ProfileError:
            abstract = False
        if not abstract:
            found[name] = path
    return found


def refuse_abstract(profile: Profile, dirs: Sequence[Path]) -> None:
    """`run` (and the doctor's dry run) on a base profile: say what it is for and what to run instead."""
    if not profile.abstract:
        return
    children = []
    for name, path in sorted(runnable_workspaces(dirs).items()):
        try:
            if read_toml(path).get("extends") == profile.workspace:
                children.append(name)
        except ProfileError:
            continue
    hint = f" (e.g. {', '.join(children)})" if children else ""
    raise ProfileError(f"{profile.path}: abstract = true: workspace {profile.workspace!r} is a base for "
                       f"`extends`, not run itself; run a workspace that extends it{hint}")


def load_profile(workspace: str, dirs: Sequence[Path]) -> Profile:
    """Resolve `workspace` along `dirs`, follow `extends`, validate everything."""
    return _load(workspace, dirs, chain=())


def load_draft(path: Path, workspace: str, dirs: Sequence[Path]) -> Profile:
    """A profile file that is not (yet) on the lookup path, read as `workspace`'s: `policy replay --profile`
    judges past requests by a draft before it goes live. Its `extends` resolve along `dirs` as usual."""
    if not path.is_file():
        raise ProfileError(f"{path}: no such profile file")
    return _load(workspace, dirs, chain=(), path=path)


def _load(workspace: str, dirs: Sequence[Path], chain: tuple[str, ...], path: Path | None = None) -> Profile:
    path = path or find_profile(workspace, dirs)
    if workspace in chain:
        cycle = " -> ".join((*chain, workspace))
        raise ProfileError(f"{path}: extends: cycle {cycle}. Remove one of the `extends` keys.")
    raw = read_toml(path)
    reader = _Reader(path)
    reader.check_keys("", raw, TOP_KEYS)
    version = raw.get("version")
    if type(version) is not int or version != SCHEMA_VERSION:  # `true` and `1.0` equal 1 in Python
        raise ProfileError(
            f"{path}: version: expected `version = {SCHEMA_VERSION}` at the top of the file, "
            + (f"found {version!r}" if "version" in raw else "but the key is missing")
        )
    description = reader.string("description", raw.get("description", ""))
    abstract = reader.boolean("abstract", raw.get("abstract", False))
    extends = raw.get("extends")
    parent: Profile | None = None
    if extends is not None:
        extends = reader.string("extends", extends)
        try:
            find_profile(extends, dirs)  # a bad or missing parent is this file's error
        except ProfileError as exc:
            raise ProfileError(f"{path}: extends: {exc.message}") from None
        parent = _load(extends, dirs, chain=(*chain, workspace))
    run = _parse_run(reader, raw.get("run", {}), parent.run if parent else None, raw_has_run="run" in raw)
    notify = _parse_notify(reader, raw["notify"]) if "notify" in raw else parent.notify if parent else None
    own = _parse_credentials(reader, workspace, raw.get("credentials", {}))
    credentials = dict(parent.credentials) if parent else {}
    credentials.update(own)  # own credentials win over inherited ones of the same name
    _check_env_secrets_withheld(reader, run, credentials)
    return Profile(
        workspace=workspace,
        path=path,
        description=description,
        extends=extends,
        run=run,
        credentials=credentials,
        sources=(path, *(parent.sources if parent else ())),
        tags=_parse_tags(reader, raw.get("tags", [])),
        guard=_parse_guard(reader, raw.get("guard", {}), parent.guard if parent else GuardSettings()),
        abstract=abstract,
        notify=notify,
    )


def read_guard_identifiers(path: Path) -> tuple[str, ...]:
    """Another workspace's `guard.identifiers`, read without loading the rest of its profile.

    A run guards against every other client's identifiers, so another profile's unrelated mistake must not stop
    it; a `[guard]` table that cannot be read does (the guard fails closed).
    """
    return _parse_guard(_Reader(path), read_toml(path).get("guard", {}), GuardSettings()).identifiers


def _parse_tags(reader: _Reader, value: Any) -> tuple[str, ...]:
    tags = reader.string_list("tags", value)
    for tag in tags:
        if not WORKSPACE_NAME.fullmatch(tag):
            raise reader.fail("tags", f"{tag!r} is not a valid tag: use lower-case letters, digits, '-' and '_'")
    return tags


def _parse_guard(reader: _Reader, value: Any, inherited: GuardSettings) -> GuardSettings:
    table = reader.table("guard", value)
    reader.check_keys("guard.", table, GUARD_KEYS)
    identifiers = reader.string_list("guard.identifiers", table.get("identifiers", []))
    for index, identifier in enumerate(identifiers):
        if len(identifier.strip()) < MIN_IDENTIFIER_LENGTH or identifier != identifier.strip():
            raise reader.fail(f"guard.identifiers[{index}]", f"{identifier!r}: an identifier is at least "
                              f"{MIN_IDENTIFIER_LENGTH} characters without leading or trailing blanks, so it "
                              "cannot match inside ordinary text")
    responses: str = inherited.responses
    if "responses" in table:
        responses = reader.string("guard.responses", table["responses"])
        if responses not in GUARD_RESPONSES:
            raise reader.fail("guard.responses", f"expected one of {', '.join(GUARD_RESPONSES)}, got {responses!r}")
    max_body = (reader.converted("guard.max_body", table["max_body"], parse_size) if "max_body" in table
                else inherited.max_body)
    return GuardSettings(identifiers=identifiers, responses=responses, max_body=max_body)  # type: ignore[arg-type]


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}. Fix the syntax at that line.") from None
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read profile: {exc.strerror}") from None


class _Reader:
    """Typed accessors that turn a wrong value into an error naming file, key and fix."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, problem: str) -> ProfileError:
        where = f"{self.path}: {key}" if key else str(self.path)
        return ProfileError(f"{where}: {problem}")

    def check_keys(self, prefix: str, table: Mapping[str, Any], allowed: Sequence[str]) -> None:
        for key in table:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                fix = f"did you mean `{close[0]}`?" if close else f"allowed keys: {', '.join(allowed)}"
                raise self.fail(f"{prefix}{key}", f"unknown key; {fix}")

    def table(self, key: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a table, got {_type_name(value)}")
        return value

    def string(self, key: str, value: Any) -> str:
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {_type_name(value)}")
        return value

    def positive_int(self, key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.fail(key, f"expected a whole number greater than zero, got {value!r}")
        return value

    def boolean(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {value!r}")
        return value

    def string_list(self, key: str, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self.fail(key, "expected a list of strings, e.g. [\"a\", \"b\"]")
        return tuple(value)

    def string_map(self, key: str, value: Any, name_pattern: re.Pattern[str] = ENV_NAME) -> dict[str, str]:
        table = self.table(key, value)
        for name, item in table.items():
            if not name_pattern.fullmatch(name):
                raise self.fail(f"{key}.{name}", "not a valid environment variable name")
            if not isinstance(item, str):
                raise self.fail(f"{key}.{name}", f"expected a string, got {_type_name(item)}")
        return dict(table)

    def converted(self, key: str, value: Any, convert: Callable[[Any], Any]) -> Any:
        try:
            return convert(value)
        except (ValueError, TypeError) as exc:
            raise self.fail(key, str(exc)) from None


def _type_name(value: Any) -> str:
    return {dict: "a table", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


def _parse_run(reader: _Reader, value: Any, inherited: RunSettings | None, raw_has_run: bool) -> RunSettings:
    base = inherited or RunSettings()
    if not raw_has_run:
        return base
    table = reader.table("run", value)
    reader.check_keys("run.", table, RUN_KEYS)
    updates: dict[str, Any] = {}
    if "timeout" in table:
        updates["timeout"] = reader.converted("run.timeout", table["timeout"], parse_duration)
    for key in ("max_requests", "processes", "cpu_seconds"):
        if key in table:
            updates[key] = reader.positive_int(f"run.{key}", table[key])
    if "memory" in table:
        updates["memory"] = reader.converted("run.memory", table["memory"], parse_size)
    if "env_keep" in table:
        keep = reader.string_list("run.env_keep", table["env_keep"])
        for name in keep:
            if not ENV_GLOB.fullmatch(name):
                raise reader.fail("run.env_keep", f"{name!r} is not a variable name or glob such as \"LC_*\"")
        updates["env_keep"] = keep
    if "env_set" in table:
        env_set = reader.string_map("run.env_set", table["env_set"])
        for name in env_set:
            if name.startswith("OUTLOOP_"):
                raise reader.fail(f"run.env_set.{name}", "OUTLOOP_* variables are set by outloop itself")
        updates["env_set"] = {**base.env_set, **env_set}
    if "network" in table:
        network = reader.string("run.network", table["network"])
        try:
            updates["network"] = NetworkMode(network)
        except ValueError:
            raise reader.fail("run.network", f"expected one of {', '.join(NetworkMode)}, got {network!r}") from None
    if "hide" in table:
        updates["hide"] = (*base.hide, *reader.string_list("run.hide", table["hide"]))
    if "filesystem" in table:
        filesystem = reader.string("run.filesystem", table["filesystem"])
        if filesystem not in FILESYSTEM_MODES:
            raise reader.fail("run.filesystem", f"expected one of {', '.join(FILESYSTEM_MODES)}, got {filesystem!r}")
        updates["filesystem"] = filesystem
    for key in ("read", "write"):
        if key in table:
            updates[key] = (*getattr(base, key), *_view_paths(reader, f"run.{key}", table[key]))
    if "egress" in table:
        updates["egress"] = (*base.egress, *_parse_egress(reader, reader.string_list("run.egress", table["egress"])))
    if "proxy" in table:
        updates["proxy"] = reader.boolean("run.proxy", table["proxy"])
    return RunSettings(**{**base.__dict__, **updates})


def _parse_notify(reader: _Reader, value: Any) -> NotifySettings:
    table = reader.table("notify", value)
    reader.check_keys("notify.", table, NOTIFY_KEYS)
    if "command" not in table:
        raise reader.fail("notify.command", "missing; add e.g. `command = [\"/usr/local/bin/notify-team\"]`")
    command = reader.string_list("notify.command", table["command"])
    if not command or not command[0]:
        raise reader.fail("notify.command", "empty; name the program to run, e.g. [\"mail\", \"-s\", \"loop\", "
                                            "\"ops@example.com\"]")
    on = reader.string_list("notify.on", table.get("on", ["failure"]))
    for condition in on:
        if condition not in NOTIFY_CONDITIONS:
            close = difflib.get_close_matches(condition, NOTIFY_CONDITIONS, n=1)
            fix = f"did you mean {close[0]!r}?" if close else f"use any of {', '.join(NOTIFY_CONDITIONS)}"
            raise reader.fail("notify.on", f"{condition!r} is not a condition; {fix}")
    return NotifySettings(on=on, command=command)


def _view_paths(reader: _Reader, key: str, value: Any) -> tuple[str, ...]:
    """Absolute paths, or `~`-relative ones (the operator's real home); never the whole disk."""
    paths = reader.string_list(key, value)
    for path in paths:
        if not (path.startswith("/") or path == "~" or path.startswith("~/")) or "\0" in path:
            raise reader.fail(key, f"{path!r} is not an absolute path: write /srv/data or ~/data")
        if os.path.normpath(path) == "/":
            raise reader.fail(key, "\"/\" is the whole host: set run.filesystem = \"host\" instead, if the loop "
                                   "really needs it")
    return paths


def _parse_egress(reader: _Reader, entries: Sequence[str]) -> list[EgressRule]:
    rules = []
    for index, text in enumerate(entries):
        try:
            rules.append(parse_egress_rule(text))
        except EgressError as exc:
            raise reader.fail(f"run.egress[{index}]", f"{exc}; write a host name, host:port or "
                              "*.domain[:port] (no scheme, no path), e.g. \"pypi.org\"") from None
    return rules


def _check_env_secrets_withheld(reader: _Reader, run: RunSettings, credentials: Mapping[str, Credential]) -> None:
    """An `env:VAR` secret must not reach the child through `env_keep` (the child never holds a secret)."""
    for credential in credentials.values():
        scheme, _, variable = credential.secret_ref.partition(":")
        if scheme != "env" or variable in run.env_set:
            continue
        for pattern in run.env_keep:
            if fnmatch.fnmatchcase(variable, pattern):
                raise reader.fail(
                    "run.env_keep", f"{pattern!r} would hand the child {variable}, the secret of credential "
                    f"{credential.name!r}; keep only the variables the loop needs"
                )


def _parse_credentials(reader: _Reader, workspace: str, value: Any) -> dict[str, Credential]:
    table = reader.table("credentials", value)
    return {name: _parse_credential(reader, workspace, name, raw) for name, raw in table.items()}


def _parse_credential(reader: _Reader, workspace: str, name: str, value: Any) -> Credential:
    prefix = f"credentials.{name}"
    if not CREDENTIAL_NAME.fullmatch(name):
        raise reader.fail(prefix, "credential names use lower-case letters, digits, '-' and '_'")
    table = reader.table(prefix, value)
    reader.check_keys(f"{prefix}.", table, CREDENTIAL_KEYS)
    for required in ("secret", "base_url"):
        if required not in table:
            example = {"secret": "secret = \"keyring\"", "base_url": "base_url = \"https://api.example.com\""}
            raise reader.fail(f"{prefix}.{required}", f"missing; add e.g. `{example[required]}`")
    secret_ref = reader.string(f"{prefix}.secret", table["secret"])
    _check_secret_ref(reader, f"{prefix}.secret", secret_ref)
    base_url = _check_base_url(reader, f"{prefix}.base_url", reader.string(f"{prefix}.base_url",
                                                                          table["base_url"]))
    auth = parse_auth(reader, prefix, table, _check_base_url)
    inject = _parse_inject(reader, f"{prefix}.inject", table.get("inject"))
    custom_methods = _parse_custom_methods(reader, f"{prefix}.custom_methods", table.get("custom_methods", []))
    allow = _parse_rules(reader, f"{prefix}.allow", table.get("allow", []), custom_methods)
    deny = _parse_rules(reader, f"{prefix}.deny", table.get("deny", []), custom_methods)
    rate = reader.converted(f"{prefix}.rate", table["rate"], parse_rate) if "rate" in table else None
    max_requests = (reader.positive_int(f"{prefix}.max_requests", table["max_requests"])
                    if "max_requests" in table else None)
    reveal = reader.boolean(f"{prefix}.reveal", table.get("reveal", False))
    child_env = reader.string_map(f"{prefix}.child_env", table.get("child_env", {}))
    for env_name in child_env:
        if env_name.startswith("OUTLOOP_"):
            raise reader.fail(f"{prefix}.child_env.{env_name}", "OUTLOOP_* variables are set by outloop itself")
    description = reader.string(f"{prefix}.description", table.get("description", ""))
    timeouts = {key: reader.converted(f"{prefix}.{key}", table[key], parse_duration)
                for key in ("connect_timeout", "read_timeout") if key in table}
    ca_file = _check_ca_file(reader, f"{prefix}.ca_file", table["ca_file"]) if "ca_file" in table else None
    return Credential(
        name=name, owner=workspace, secret_ref=secret_ref, base_url=base_url, inject=inject,
        allow=allow, deny=deny, rate=rate, max_requests=max_requests, reveal=reveal,
        child_env=child_env, description=description, auth=auth, ca_file=ca_file, **timeouts,
    )


def _check_ca_file(reader: _Reader, key: str, value: Any) -> str:
    """Relative paths are relative to the profile, so a profile and its private CA can travel together."""
    path = (reader.path.parent / Path(reader.string(key, value)).expanduser()).resolve()
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        problem = exc.strerror if isinstance(exc, OSError) else "not a PEM text file"
        raise reader.fail(key, f"cannot read {path}: {problem}; point it at a PEM file of CA certificates") from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise reader.fail(key, f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return str(path)


def _check_secret_ref(reader: _Reader, key: str, ref: str) -> None:
    if ref == "keyring":
        return
    scheme, sep, rest = ref.partition(":")
    if not sep or scheme not in ("env", "file", "cmd") or not rest.strip():
        raise reader.fail(
            key, f"{ref!r} is not a secret source; use \"keyring\", \"env:VAR\", \"file:PATH\" or \"cmd:COMMAND\""
        )
    if scheme == "env" and not ENV_NAME.fullmatch(rest):
        raise reader.fail(key, f"{rest!r} is not an environment variable name")


def _check_base_url(reader: _Reader, key: str, url: str) -> str:
    parts = urlsplit(url)
    try:
        well_formed = parts.port != 0 and not re.search(r"[\s\x00-\x1f\x7f]", url)
    except ValueError:  # `.port` raises for a port out of range or not a number
        well_formed = False
    if parts.scheme not in ("https", "http") or not parts.hostname or not well_formed:
        raise reader.fail(key, f"{url!r} is not an http(s) URL; write e.g. \"https://api.example.com\"")
    if "?" in url or "#" in url or parts.username is not None or parts.password is not None:
        raise reader.fail(key, "must not hold a query, fragment or user info; use `inject` for credentials")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise reader.fail(
            key, "plain http would send the secret in clear text; use https (http is allowed for loopback only)"
        )
    return url.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_inject(reader: _Reader, key: str, value: Any) -> Injection:
    if value is None:
        return Injection(style="header", name=DEFAULT_INJECT_HEADER, template=DEFAULT_INJECT_VALUE)
    table = reader.table(key, value)
    reader.check_keys(f"{key}.", table, INJECT_KEYS)
    styles = [style for style in ("header", "query", "basic") if style in table]
    if len(styles) != 1:
        raise reader.fail(
            key, "set exactly one of { header = \"...\", value = \"... {secret}\" }, { query = \"param\" } "
            "or { basic = \"USER\" }"
        )
    style = styles[0]
    name = reader.string(f"{key}.{style}", table[style])
    if style != "basic" and not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name):
        raise reader.fail(f"{key}.{style}", f"{name!r} is not a valid {style} name")
    if "value" in table and style != "header":
        raise reader.fail(f"{key}.value", "`value` only goes with `header`")
    if style == "header":
        template = reader.string(f"{key}.value", table.get("value", "{secret}"))
        if "{secret}" not in template:
            raise reader.fail(f"{key}.value", "must contain {secret}, e.g. \"Bearer {secret}\"")
        if name.lower() in ("host", "content-length", "transfer-encoding", "connection"):
            raise reader.fail(f"{key}.header", f"outloop will not inject into {name}")
        return Injection(style="header", name=name, template=template)
    if style == "basic" and ":" in name:
        raise reader.fail(f"{key}.basic", "a basic-auth user name cannot contain ':'")
    return Injection(style=style, name=name)


def _parse_custom_methods(reader: _Reader, key: str, value: Any) -> tuple[str, ...]:
    methods = reader.string_list(key, value)
    for method in methods:
        if not CUSTOM_METHOD.fullmatch(method):
            raise reader.fail(key, f"{method!r} is not a method name: use upper-case letters, '-' and '_', "
                                   "e.g. \"PROPFIND\"")
        if method in STANDARD_METHODS:
            raise reader.fail(key, f"{method} is a standard method already; list only custom verbs here")
    return methods


def _parse_rules(reader: _Reader, key: str, value: Any, custom_methods: tuple[str, ...]) -> tuple[Rule, ...]:
    texts = reader.string_list(key, value)
    rules = []
    for index, text in enumerate(texts):
        try:
            rules.append(parse_rule(text, custom_methods))
        except RuleError as exc:
            raise reader.fail(f"{key}[{index}]", f"bad rule {text!r}: {exc}") from None
    return tuple(rules)
