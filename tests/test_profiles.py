"""Spec for outloop_cli.profiles: schema v1, its error messages, `extends`, lookup order and the worked examples."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from outloop_cli.errors import EXIT_OUTLOOP_FAILED, ProfileError
from outloop_cli.profiles import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_ENV_KEEP,
    DEFAULT_READ_TIMEOUT,
    Injection,
    Profile,
    RunSettings,
    available_workspaces,
    check_workspace_name,
    find_profile,
    load_profile,
    runnable_workspaces,
)
from outloop_cli.units import Rate

REPO_PROFILES = Path(__file__).resolve().parent.parent / "profiles"

CRM = """
[credentials.crm]
secret = "keyring"
base_url = "https://api.example.com"
allow = ["GET /contacts/*"]
"""


@pytest.fixture
def pdir(tmp_path: Path) -> Path:
    directory = tmp_path / "profiles"
    directory.mkdir()
    return directory


def write(directory: Path, workspace: str, text: str) -> Path:
    path = directory / f"{workspace}.toml"
    path.write_text(textwrap.dedent(text))
    return path


def load(directory: Path, text: str, workspace: str = "acme") -> Profile:
    write(directory, workspace, text)
    return load_profile(workspace, [directory])


def error(directory: Path, text: str, workspace: str = "acme") -> str:
    write(directory, workspace, text)
    with pytest.raises(ProfileError) as caught:
        load_profile(workspace, [directory])
    return caught.value.message


def with_credential(lines: str) -> str:
    """A v1 profile whose `crm` credential has the usual two required keys plus `lines`."""
    return f'version = 1\n[credentials.crm]\nsecret = "keyring"\nbase_url = "https://api.example.com"\n{lines}\n'


def with_run(lines: str) -> str:
    return f"version = 1\n[run]\n{lines}\n"


# ----- loading -------------------------------------------------------------------------------------------------


def test_minimal_profile_loads_with_defaults(pdir: Path) -> None:
    profile = load(pdir, "version = 1\n" + CRM)
    assert (profile.workspace, profile.path, profile.description, profile.extends) == (
        "acme", pdir / "acme.toml", "", None)
    assert profile.run == RunSettings()
    assert profile.sources == (pdir / "acme.toml",)
    crm = profile.credentials["crm"]
    assert (crm.name, crm.owner, crm.secret_ref, crm.base_url) == ("crm", "acme", "keyring", "https://api.example.com")
    assert crm.inject == Injection("header", "Authorization", "Bearer {secret}")
    assert [rule.text for rule in crm.allow] == ["GET /contacts/*"]
    assert (crm.deny, crm.rate, crm.max_requests, crm.reveal, dict(crm.child_env), crm.description) == (
        (), None, None, False, {}, "")
    assert (crm.connect_timeout, crm.read_timeout) == (DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT)


def test_run_defaults_keep_the_documented_variables() -> None:
    assert RunSettings().env_keep == ("PATH", "HOME", "LANG", "LC_*", "TZ", "TERM") == DEFAULT_ENV_KEEP
    assert RunSettings().network == "auto"


def test_profile_without_credentials_loads(pdir: Path) -> None:
    assert load(pdir, "version = 1\n").credentials == {}


def test_the_full_documented_schema_loads(pdir: Path) -> None:
    profile = load(pdir, """
        version = 1
        description = "Acme Corp: nightly CRM lead sync"

        [run]
        timeout = "2h"
        max_requests = 5000
        env_keep = ["PATH", "HOME", "LANG", "LC_*", "TZ", "TERM"]
        env_set = { LOOP_CLIENT = "acme" }
        network = "broker-only"
        hide = ["~/.ssh", "~/.aws"]
        memory = "512M"
        processes = 64
        cpu_seconds = 600

        [credentials.crm]
        secret = "keyring"
        base_url = "https://api.hubapi.com/"
        inject = { header = "Authorization", value = "Bearer {secret}" }
        allow = ["GET /crm/v3/objects/contacts/**", "POST /crm/v3/objects/contacts"]
        deny = ["* /crm/v3/objects/contacts/*/merge"]
        rate = "10/s"
        max_requests = 2000
        reveal = true
        child_env = { HUBSPOT_BASE_URL = "{url}", HUBSPOT_TOKEN = "{token}" }
        description = "HubSpot private app"
        connect_timeout = "5s"
        read_timeout = "10m"
    """)
    assert profile.description == "Acme Corp: nightly CRM lead sync"
    assert profile.run == RunSettings(
        timeout=7200.0, max_requests=5000, env_keep=DEFAULT_ENV_KEEP, env_set={"LOOP_CLIENT": "acme"},
        network="broker-only", hide=("~/.ssh", "~/.aws"), memory=512 * 1024**2, processes=64, cpu_seconds=600)
    crm = profile.credentials["crm"]
    assert crm.base_url == "https://api.hubapi.com"
    assert crm.host == "api.hubapi.com"
    assert [r.text for r in crm.deny] == ["* /crm/v3/objects/contacts/*/merge"]
    assert (crm.rate, crm.max_requests, crm.reveal) == (Rate(10, 1.0), 2000, True)
    assert crm.child_env == {"HUBSPOT_BASE_URL": "{url}", "HUBSPOT_TOKEN": "{token}"}
    assert (crm.description, crm.connect_timeout, crm.read_timeout) == ("HubSpot private app", 5.0, 600.0)


@pytest.mark.parametrize("ref", ["keyring", "env:CRM_TOKEN", "env:_x1", "file:~/.secrets/crm", "file:/run/s",
                                 "cmd:pass show acme/crm", "cmd:op read op://vault/crm/token"])
def test_every_secret_source_form_is_accepted(pdir: Path, ref: str) -> None:
    profile = load(pdir, f'version = 1\n[run]\nenv_keep = ["PATH"]\n[credentials.crm]\nsecret = "{ref}"\n'
                         'base_url = "https://api.example.com"\n')
    assert profile.credentials["crm"].secret_ref == ref


@pytest.mark.parametrize("network", ["auto", "broker-only", "open"])
def test_every_network_mode_is_accepted(pdir: Path, network: str) -> None:
    assert load(pdir, with_run(f'network = "{network}"')).run.network == network


@pytest.mark.parametrize(("url", "stored"), [
    ("https://api.example.com", "https://api.example.com"),
    ("https://api.example.com/", "https://api.example.com"),
    ("https://api.example.com/v1/", "https://api.example.com/v1"),
    ("https://api.example.com:8443/v1", "https://api.example.com:8443/v1"),
    ("http://localhost:8080", "http://localhost:8080"),
    ("http://LOCALHOST:8080", "http://LOCALHOST:8080"),
    ("http://127.0.0.1", "http://127.0.0.1"),
    ("http://127.9.9.9:1/x", "http://127.9.9.9:1/x"),
    ("http://[::1]:3000", "http://[::1]:3000"),
])
def test_base_url_accepts_https_anywhere_and_http_on_loopback(pdir: Path, url: str, stored: str) -> None:
    assert load(pdir, with_credential("").replace("https://api.example.com", url)).credentials["crm"].base_url == stored


# ----- every error names file, key and fix ------------------------------------------------------------------


def test_errors_are_profile_errors_with_outloops_failure_exit_code(pdir: Path) -> None:
    write(pdir, "acme", "version = 2\n")
    with pytest.raises(ProfileError) as caught:
        load_profile("acme", [pdir])
    assert caught.value.exit_code == EXIT_OUTLOOP_FAILED == 125


@pytest.mark.parametrize(("text", "key", "fix"), [
    ("verison = 1\nversion = 1", "verison", "did you mean `version`?"),
    ("version = 1\ndescriptoin = 'x'", "descriptoin", "did you mean `description`?"),
    ("version = 1\nextend = 'agency'", "extend", "did you mean `extends`?"),
    ("version = 1\n[credential.crm]\nsecret = 'keyring'", "credential", "did you mean `credentials`?"),
    ("version = 1\n[runs]\ntimeout = '1h'", "runs", "did you mean `run`?"),
    ("version = 1\nzzz = 1", "zzz", "allowed keys: version, description, extends, abstract, run, notify, credentials, "
                                     "tags, guard"),
    (with_run("timout = '1h'"), "run.timout", "did you mean `timeout`?"),
    (with_run("max_request = 5"), "run.max_requests".replace("requests", "request"), "did you mean `max_requests`?"),
    (with_run("env_kep = []"), "run.env_kep", "did you mean `env_keep`?"),
    (with_run("netwrok = 'open'"), "run.netwrok", "did you mean `network`?"),
    (with_credential("base_uri = 'x'"), "credentials.crm.base_uri", "did you mean `base_url`?"),
    (with_credential("alow = []"), "credentials.crm.alow", "did you mean `allow`?"),
    (with_credential("reveals = true"), "credentials.crm.reveals", "did you mean `reveal`?"),
    (with_credential("childenv = {}"), "credentials.crm.childenv", "did you mean `child_env`?"),
    (with_credential("inject = { headr = 'X-Key' }"), "credentials.crm.inject.headr", "did you mean `header`?"),
    (with_credential("inject = { header = 'X-Key', valeu = '{secret}' }"), "credentials.crm.inject.valeu",
     "did you mean `value`?"),
])
def test_unknown_keys_are_named_with_a_suggestion(pdir: Path, text: str, key: str, fix: str) -> None:
    assert error(pdir, text) == f"{pdir / 'acme.toml'}: {key}: unknown key; {fix}"


@pytest.mark.parametrize(("text", "key", "problem"), [
    ("version = 1\ndescription = 1", "description", "expected a string, got a number"),
    ("version = 1\nrun = 1", "run", "expected a table, got a number"),
    ("version = 1\ncredentials = []", "credentials", "expected a table, got a list"),
    ("version = 1\ncredentials = { crm = 'keyring' }", "credentials.crm", "expected a table, got a string"),
    (with_run("timeout = true"), "run.timeout", "expected a duration"),
    (with_run("timeout = [1]"), "run.timeout", "expected a duration"),
    (with_run("max_requests = '5'"), "run.max_requests", "expected a whole number greater than zero, got '5'"),
    (with_run("max_requests = 0"), "run.max_requests", "expected a whole number greater than zero, got 0"),
    (with_run("max_requests = -1"), "run.max_requests", "expected a whole number greater than zero"),
    (with_run("max_requests = 1.5"), "run.max_requests", "expected a whole number greater than zero"),
    (with_run("max_requests = true"), "run.max_requests", "expected a whole number greater than zero, got True"),
    (with_run("processes = 0"), "run.processes", "expected a whole number greater than zero"),
    (with_run("cpu_seconds = '10m'"), "run.cpu_seconds", "expected a whole number greater than zero"),
    (with_run("memory = 1.5"), "run.memory", "expected a size"),
    (with_run("env_keep = 'PATH'"), "run.env_keep", 'expected a list of strings, e.g. ["a", "b"]'),
    (with_run("env_keep = ['PATH', 1]"), "run.env_keep", "expected a list of strings"),
    (with_run("env_set = ['A=1']"), "run.env_set", "expected a table, got a list"),
    (with_run("env_set = { A = 1 }"), "run.env_set.A", "expected a string, got a number"),
    (with_run("env_set = { A = { B = 'c' } }"), "run.env_set.A", "expected a string, got a table"),
    (with_run("network = 1"), "run.network", "expected a string, got a number"),
    (with_run("network = 'none'"), "run.network", "expected one of auto, broker-only, open, got 'none'"),
    (with_run("network = 'Auto'"), "run.network", "expected one of auto, broker-only, open"),
    (with_run("hide = '~/.ssh'"), "run.hide", "expected a list of strings"),
    (with_credential("secret = 1").replace('secret = "keyring"\n', ""), "credentials.crm.secret",
     "expected a string, got a number"),
    (with_credential("base_url = true").replace('base_url = "https://api.example.com"\n', ""),
     "credentials.crm.base_url", "expected a string, got a boolean"),
    (with_credential("allow = 'GET /x'"), "credentials.crm.allow", "expected a list of strings"),
    (with_credential("deny = [1]"), "credentials.crm.deny", "expected a list of strings"),
    (with_credential("rate = 10"), "credentials.crm.rate", "10 is not a rate; write COUNT/UNIT such as \"10/s\""),
    (with_credential("max_requests = 0"), "credentials.crm.max_requests", "expected a whole number greater than zero"),
    (with_credential("reveal = 'yes'"), "credentials.crm.reveal", "expected true or false, got 'yes'"),
    (with_credential("reveal = 1"), "credentials.crm.reveal", "expected true or false, got 1"),
    (with_credential("child_env = 'X'"), "credentials.crm.child_env", "expected a table, got a string"),
    (with_credential("child_env = { X = 1 }"), "credentials.crm.child_env.X", "expected a string, got a number"),
    (with_credential("description = []"), "credentials.crm.description", "expected a string, got a list"),
    (with_credential("connect_timeout = 'soon'"), "credentials.crm.connect_timeout", "is not a duration"),
    (with_credential("read_timeout = 0"), "credentials.crm.read_timeout", "greater than zero"),
    (with_credential("inject = 'header'"), "credentials.crm.inject", "expected a table, got a string"),
    (with_credential("inject = { header = 1 }"), "credentials.crm.inject.header", "expected a string, got a number"),
    (with_credential("inject = { header = 'X', value = 1 }"), "credentials.crm.inject.value", "expected a string"),
])
def test_wrong_types_and_values_name_file_key_and_expectation(pdir: Path, text: str, key: str, problem: str) -> None:
    message = error(pdir, text)
    assert message.startswith(f"{pdir / 'acme.toml'}: {key}: ")
    assert problem in message


@pytest.mark.parametrize(("text", "key"), [
    (with_credential("").replace('secret = "keyring"\n', ""), "secret"),
    (with_credential("").replace('base_url = "https://api.example.com"\n', ""), "base_url"),
])
def test_missing_required_credential_keys_say_what_to_add(pdir: Path, text: str, key: str) -> None:
    message = error(pdir, text)
    assert message.startswith(f"{pdir / 'acme.toml'}: credentials.crm.{key}: missing; add e.g. `{key} = ")


# ----- rules -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rules", "index", "fragment"), [
    (["GET"], 0, "separated by exactly one space"),
    (["GET  /x"], 0, "separated by exactly one space"),
    (["get /x"], 0, "write GET, not get"),
    (["/x GET"], 0, "the method comes first"),
    (["GET x"], 0, "must start with '/'"),
    ([""], 0, "the rule is empty"),
    (["GET /a/../b"], 0, "dot segments"),
    (["GET /a?b=1"], 0, "never the query"),
    (["GET /items/{id}"], 0, "URL template placeholder"),
    (["GET /ok", "GET /a*b"], 1, "mixes '*' with other characters"),
    (["DELET /items/*"], 0, "did you mean DELETE?"),
    (["PROPFIND /dav/*"], 0, "list it in this credential's custom_methods"),
])
@pytest.mark.parametrize("list_key", ["allow", "deny"])
def test_bad_rules_are_named_by_list_and_index_with_the_reason(pdir: Path, rules: list[str], index: int,
                                                               fragment: str, list_key: str) -> None:
    quoted = ", ".join(f'"{rule}"' for rule in rules)
    message = error(pdir, with_credential(f"{list_key} = [{quoted}]"))
    assert message.startswith(f"{pdir / 'acme.toml'}: credentials.crm.{list_key}[{index}]: bad rule "
                              f"{rules[index]!r}: ")
    assert fragment in message


def test_custom_methods_let_rules_name_a_custom_verb(pdir: Path) -> None:
    profile = load(pdir, with_credential('custom_methods = ["PROPFIND"]\nallow = ["PROPFIND /dav/*", "GET /dav/*"]'))
    assert [rule.method for rule in profile.credentials["crm"].allow] == ["PROPFIND", "GET"]


@pytest.mark.parametrize(("methods", "fragment"), [
    ('["GET"]', "GET is a standard method already"),
    ('["propfind"]', "is not a method name"),
    ('"PROPFIND"', "expected a list of strings"),
])
def test_custom_methods_must_be_custom_upper_case_verbs(pdir: Path, methods: str, fragment: str) -> None:
    message = error(pdir, with_credential(f"custom_methods = {methods}"))
    assert message.startswith(f"{pdir / 'acme.toml'}: credentials.crm.custom_methods: ")
    assert fragment in message


# ----- units -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "key", "fragment"), [
    (with_run("timeout = '2 hours'"), "run.timeout", "is not a duration; write a number with a unit"),
    (with_run("timeout = '0s'"), "run.timeout", "greater than zero"),
    (with_run("timeout = -5"), "run.timeout", "greater than zero"),
    (with_run("timeout = inf"), "run.timeout", "finite number"),
    (with_run("timeout = nan"), "run.timeout", "finite number"),
    (with_run("memory = 'lots'"), "run.memory", "is not a size; write a number with K, M, G or T"),
    (with_run("memory = 0"), "run.memory", "greater than zero"),
    (with_credential("rate = '10/d'"), "credentials.crm.rate", "is not a rate; write COUNT/UNIT"),
    (with_credential("rate = '0/s'"), "credentials.crm.rate", "at least one request per period"),
    (with_credential("connect_timeout = '5 s econds'"), "credentials.crm.connect_timeout", "is not a duration"),
])
def test_bad_durations_rates_and_sizes_name_the_key_and_the_accepted_forms(pdir: Path, text: str, key: str,
                                                                           fragment: str) -> None:
    message = error(pdir, text)
    assert message.startswith(f"{pdir / 'acme.toml'}: {key}: ")
    assert fragment in message


@pytest.mark.parametrize(("value", "seconds"), [('"90s"', 90.0), ("90", 90.0), ("1.5", 1.5), ('"1h30m"', 5400.0)])
def test_run_timeout_takes_a_duration_or_seconds(pdir: Path, value: str, seconds: float) -> None:
    assert load(pdir, with_run(f"timeout = {value}")).run.timeout == seconds


# ----- base_url ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["api.example.com", "ftp://api.example.com", "https://", "https:///v1", "//api.x.com",
                                 "", "https://api.example.com:99999", "https://api.example.com:abc",
                                 "https://api.example.com:0", "https://api.exa mple.com", "https://api.example.com\\n",
                                 "https://api.example.com/v1\\t", "\\thttps://api.example.com"])
def test_base_url_that_is_not_an_http_url_is_refused_with_an_example(pdir: Path, url: str) -> None:
    message = error(pdir, with_credential("").replace("https://api.example.com", url))
    assert message.startswith(f"{pdir / 'acme.toml'}: credentials.crm.base_url: ")
    assert 'is not an http(s) URL; write e.g. "https://api.example.com"' in message


@pytest.mark.parametrize("url", ["http://api.example.com", "http://0.0.0.0:8080", "http://10.0.0.1",
                                 "http://192.168.1.10", "http://localhost.evil.example", "http://[::2]",
                                 "http://127.0.0.1.nip.io"])
def test_base_url_plain_http_to_a_non_loopback_host_is_refused(pdir: Path, url: str) -> None:
    message = error(pdir, with_credential("").replace("https://api.example.com", url))
    assert message == (f"{pdir / 'acme.toml'}: credentials.crm.base_url: plain http would send the secret in "
                       "clear text; use https (http is allowed for loopback only)")


@pytest.mark.parametrize("url", ["https://api.example.com/?key=1", "https://api.example.com/v1?",
                                 "https://api.example.com/#top", "https://user:pw@api.example.com",
                                 "https://user@api.example.com", "https://@api.example.com"])
def test_base_url_with_query_fragment_or_user_info_is_refused(pdir: Path, url: str) -> None:
    message = error(pdir, with_credential("").replace("https://api.example.com", url))
    assert message.endswith("credentials.crm.base_url: must not hold a query, fragment or user info; "
                            "use `inject` for credentials")


# ----- inject ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("inject", "expected"), [
    ('{ header = "Authorization", value = "Bearer {secret}" }',
     Injection("header", "Authorization", "Bearer {secret}")),
    ('{ header = "X-Api-Key" }', Injection("header", "X-Api-Key", "{secret}")),
    ('{ header = "X-Api-Key", value = "{secret}" }', Injection("header", "X-Api-Key", "{secret}")),
    ('{ header = "Authorization", value = "Token token={secret}, v=2" }',
     Injection("header", "Authorization", "Token token={secret}, v=2")),
    ('{ query = "hapikey" }', Injection("query", "hapikey")),
    ('{ query = "api_key" }', Injection("query", "api_key")),
    ('{ basic = "api" }', Injection("basic", "api")),
    ('{ basic = "" }', Injection("basic", "")),
    ('{ basic = "user@example.com" }', Injection("basic", "user@example.com")),
])
def test_inject_accepts_header_query_and_basic_forms(pdir: Path, inject: str, expected: Injection) -> None:
    assert load(pdir, with_credential(f"inject = {inject}")).credentials["crm"].inject == expected


@pytest.mark.parametrize(("inject", "key", "fragment"), [
    ("{}", "inject", "set exactly one of"),
    ('{ value = "Bearer {secret}" }', "inject", "set exactly one of"),
    ('{ header = "X", query = "k" }', "inject", "set exactly one of"),
    ('{ query = "k", basic = "u" }', "inject", "set exactly one of"),
    ('{ header = "X", value = "Bearer" }', "inject.value", 'must contain {secret}, e.g. "Bearer {secret}"'),
    ('{ header = "X", value = "Bearer {Secret}" }', "inject.value", "must contain {secret}"),
    ('{ query = "k", value = "{secret}" }', "inject.value", "`value` only goes with `header`"),
    ('{ basic = "u", value = "{secret}" }', "inject.value", "`value` only goes with `header`"),
    ('{ header = "X Api" }', "inject.header", "'X Api' is not a valid header name"),
    ('{ header = "" }', "inject.header", "'' is not a valid header name"),
    ('{ header = "X:Api" }', "inject.header", "is not a valid header name"),
    ('{ query = "api key" }', "inject.query", "'api key' is not a valid query name"),
    ('{ query = "" }', "inject.query", "is not a valid query name"),
    ('{ query = "a=b" }', "inject.query", "is not a valid query name"),
    ('{ header = "Host" }', "inject.header", "outloop will not inject into Host"),
    ('{ header = "content-length" }', "inject.header", "outloop will not inject into content-length"),
    ('{ header = "Transfer-Encoding" }', "inject.header", "will not inject into"),
    ('{ header = "Connection" }', "inject.header", "will not inject into"),
    ('{ basic = "user:name" }', "inject.basic", "a basic-auth user name cannot contain ':'"),
    ('{ basic = 1 }', "inject.basic", "expected a string, got a number"),
])
def test_inject_errors_name_the_key_and_the_accepted_forms(pdir: Path, inject: str, key: str, fragment: str) -> None:
    message = error(pdir, with_credential(f"inject = {inject}"))
    assert message.startswith(f"{pdir / 'acme.toml'}: credentials.crm.{key}: ")
    assert fragment in message


def test_inject_error_lists_all_three_forms(pdir: Path) -> None:
    message = error(pdir, with_credential("inject = {}"))
    assert '{ header = "...", value = "... {secret}" }' in message
    assert '{ query = "param" }' in message
    assert '{ basic = "USER" }' in message


# ----- environment names -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["1ABC", "A-B", "A B", "A.B", "É", ""])
@pytest.mark.parametrize("table", ["run.env_set", "credentials.crm.child_env"])
def test_invalid_environment_variable_names_are_refused(pdir: Path, name: str, table: str) -> None:
    text = with_run(f'env_set = {{ "{name}" = "x" }}') if table == "run.env_set" else \
        with_credential(f'child_env = {{ "{name}" = "x" }}')
    assert error(pdir, text) == f"{pdir / 'acme.toml'}: {table}.{name}: not a valid environment variable name"


@pytest.mark.parametrize("name", ["OUTLOOP_SOCKET", "OUTLOOP_URL", "OUTLOOP_TOKEN", "OUTLOOP_RUN_ID",
                                  "OUTLOOP_WORKSPACE", "OUTLOOP_ANYTHING"])
@pytest.mark.parametrize("table", ["run.env_set", "credentials.crm.child_env"])
def test_outloop_variables_are_reserved(pdir: Path, name: str, table: str) -> None:
    text = with_run(f'env_set = {{ {name} = "x" }}') if table == "run.env_set" else \
        with_credential(f'child_env = {{ {name} = "x" }}')
    assert error(pdir, text) == f"{pdir / 'acme.toml'}: {table}.{name}: OUTLOOP_* variables are set by outloop itself"


@pytest.mark.parametrize("name", ["OUTLOOPX", "MY_OUTLOOP_VAR", "outloop_lower"])
def test_names_that_only_resemble_outloop_variables_are_allowed(pdir: Path, name: str) -> None:
    assert name in load(pdir, with_run(f'env_set = {{ {name} = "x" }}')).run.env_set


@pytest.mark.parametrize("pattern", ["LC_*", "PATH", "MY_?AR", "*", "_X1"])
def test_env_keep_accepts_names_and_globs(pdir: Path, pattern: str) -> None:
    assert load(pdir, with_run(f'env_keep = ["{pattern}"]')).run.env_keep == (pattern,)


@pytest.mark.parametrize("pattern", ["A-B", "LC_[AB]", "$HOME", "", "A B", "A=B"])
def test_env_keep_refuses_what_is_neither_name_nor_glob(pdir: Path, pattern: str) -> None:
    message = error(pdir, with_run(f'env_keep = ["PATH", "{pattern}"]'))
    assert message == (f"{pdir / 'acme.toml'}: run.env_keep: {pattern!r} is not a variable name or glob "
                       'such as "LC_*"')


@pytest.mark.parametrize(("keep", "pattern"), [
    ('["PATH", "CRM_TOKEN"]', "CRM_TOKEN"),
    ('["CRM_*"]', "CRM_*"),
    ('["*"]', "*"),
    ('["*_TOKEN"]', "*_TOKEN"),
])
def test_env_keep_must_not_hand_an_env_secret_to_the_child(pdir: Path, keep: str, pattern: str) -> None:
    text = f'version = 1\n[run]\nenv_keep = {keep}\n' + CRM.replace('"keyring"', '"env:CRM_TOKEN"')
    message = error(pdir, text)
    assert message.startswith(f"{pdir / 'acme.toml'}: run.env_keep: {pattern!r} would hand the child CRM_TOKEN, "
                              "the secret of credential 'crm'")
    assert "keep only the variables the loop needs" in message


def test_default_env_keep_must_not_hand_an_env_secret_to_the_child(pdir: Path) -> None:
    message = error(pdir, "version = 1\n" + CRM.replace('"keyring"', '"env:LC_SECRET"'))
    assert "run.env_keep: 'LC_*' would hand the child LC_SECRET" in message


def test_env_secret_not_matched_by_env_keep_is_fine(pdir: Path) -> None:
    profile = load(pdir, "version = 1\n" + CRM.replace('"keyring"', '"env:CRM_TOKEN"'))
    assert profile.credentials["crm"].secret_ref == "env:CRM_TOKEN"


def test_env_secret_overridden_by_env_set_is_fine(pdir: Path) -> None:
    text = 'version = 1\n[run]\nenv_keep = ["*"]\nenv_set = { CRM_TOKEN = "" }\n'
    assert load(pdir, text + CRM.replace('"keyring"', '"env:CRM_TOKEN"')).run.env_keep == ("*",)


def test_env_keep_check_covers_inherited_env_secrets(pdir: Path) -> None:
    write(pdir, "agency", "version = 1\n" + CRM.replace('"keyring"', '"env:AGENCY_KEY"'))
    message = error(pdir, 'version = 1\nextends = "agency"\n[run]\nenv_keep = ["AGENCY_*"]\n')
    assert message.startswith(f"{pdir / 'acme.toml'}: run.env_keep: 'AGENCY_*' would hand the child AGENCY_KEY")


# ----- secret sources ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ref", "fragment"), [
    ("vault:crm", "'vault:crm' is not a secret source"),
    ("Keyring", "'Keyring' is not a secret source"),
    ("keyring:crm", "is not a secret source"),
    ("env:", "is not a secret source"),
    ("file:", "is not a secret source"),
    ("cmd:   ", "is not a secret source"),
    ("plaintext-token-abc", "is not a secret source"),
    ("env:1BAD", "'1BAD' is not an environment variable name"),
    ("env:CRM-TOKEN", "'CRM-TOKEN' is not an environment variable name"),
])
def test_bad_secret_sources_name_the_accepted_forms(pdir: Path, ref: str, fragment: str) -> None:
    message = error(pdir, with_credential("").replace('"keyring"', f'"{ref}"'))
    assert message.startswith(f"{pdir / 'acme.toml'}: credentials.crm.secret: ")
    assert fragment in message
    if "is not a secret source" in fragment:
        assert 'use "keyring", "env:VAR", "file:PATH" or "cmd:COMMAND"' in message


# ----- names ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["crm", "crm-2", "open_ai", "0day", "a" * 63])
def test_credential_names_that_are_accepted(pdir: Path, name: str) -> None:
    text = f'version = 1\n[credentials."{name}"]\nsecret = "keyring"\nbase_url = "https://api.example.com"\n'
    assert name in load(pdir, text).credentials


@pytest.mark.parametrize("name", ["CRM", "Crm", "-crm", "_crm", "crm.prod", "crm!", "crm space", "", "a" * 64, "é"])
def test_credential_names_that_are_refused(pdir: Path, name: str) -> None:
    text = f'version = 1\n[credentials."{name}"]\nsecret = "keyring"\nbase_url = "https://api.example.com"\n'
    assert error(pdir, text) == (f"{pdir / 'acme.toml'}: credentials.{name}: credential names use lower-case "
                                 "letters, digits, '-' and '_'")


@pytest.mark.parametrize("name", ["acme", "acme-corp", "client_2", "0", "a" * 63])
def test_workspace_names_that_are_accepted(name: str) -> None:
    assert check_workspace_name(name) == name


@pytest.mark.parametrize("name", ["Acme", "-acme", "_acme", "acme.corp", "acme/corp", "../etc", "", "a" * 64, "acme "])
def test_workspace_names_that_are_refused(name: str) -> None:
    with pytest.raises(ProfileError, match=r"is not a valid workspace name: use lower-case letters, digits"):
        check_workspace_name(name)


def test_find_profile_refuses_an_invalid_name_before_touching_the_disk(pdir: Path) -> None:
    with pytest.raises(ProfileError, match="not a valid workspace name"):
        find_profile("../profiles/acme", [pdir])


# ----- version and TOML ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "found"), [
    ("", "but the key is missing"),
    ("description = 'x'", "but the key is missing"),
    ("version = 2", "2"),
    ("version = 0", "0"),
    ("version = '1'", "'1'"),
    ("version = 1.0", "1.0"),
    ("version = true", "True"),
])
def test_version_must_be_exactly_1(pdir: Path, text: str, found: str) -> None:
    shown = found if found.startswith("but") else f"found {found}"
    assert error(pdir, text) == (f"{pdir / 'acme.toml'}: version: expected `version = 1` at the top of the file, "
                                 f"{shown}")


@pytest.mark.parametrize(("text", "line"), [
    ("version = ", 1),
    ("version = 1\ndescription = \"unterminated", 2),
    ("version = 1\nversion = 1", 2),
    ("version = 1\n[run]\n[run]", 3),
    ("version = 1\n[credentials.crm\n", 2),
    ("version = 1\ndescription = 'a' 'b'", 2),
])
def test_toml_syntax_errors_name_the_file_and_line(pdir: Path, text: str, line: int) -> None:
    message = error(pdir, text + "\n# more\n")
    assert message.startswith(f"{pdir / 'acme.toml'}: not valid TOML: ")
    assert f"(at line {line}, column " in message
    assert message.endswith("Fix the syntax at that line.")


def test_a_profile_that_is_not_utf8_is_refused_with_the_fix(pdir: Path) -> None:
    (pdir / "acme.toml").write_bytes(b'version = 1\ndescription = "caf\xe9"\n')
    with pytest.raises(ProfileError) as caught:
        load_profile("acme", [pdir])
    assert caught.value.message == f"{pdir / 'acme.toml'}: not UTF-8 text (byte 30); save the file as UTF-8"


# ----- extends ---------------------------------------------------------------------------------------------------

AGENCY = """
    version = 1
    description = "agency base"

    [run]
    timeout = "2h"
    max_requests = 100
    env_keep = ["PATH", "HOME"]
    env_set = { AGENCY = "yes", SHARED = "agency" }
    network = "broker-only"
    hide = ["~/.ssh"]

    [credentials.openai]
    secret = "keyring"
    base_url = "https://api.openai.com/v1"
    allow = ["POST /chat/completions"]

    [credentials.crm]
    secret = "keyring"
    base_url = "https://agency-crm.example.com"
    allow = ["GET /**"]
"""


@pytest.fixture
def agency(pdir: Path) -> Path:
    return write(pdir, "agency", AGENCY)


def test_extends_inherits_the_parents_credentials_owned_by_the_parent(pdir: Path, agency: Path) -> None:
    profile = load(pdir, 'version = 1\nextends = "agency"\n')
    assert profile.extends == "agency"
    assert set(profile.credentials) == {"openai", "crm"}
    assert profile.credentials["openai"].owner == "agency"
    assert profile.sources == (pdir / "acme.toml", agency)


def test_extends_own_credentials_win_over_inherited_ones(pdir: Path, agency: Path) -> None:
    profile = load(pdir, 'version = 1\nextends = "agency"\n' + CRM)
    crm = profile.credentials["crm"]
    assert (crm.owner, crm.base_url, [r.text for r in crm.allow]) == (
        "acme", "https://api.example.com", ["GET /contacts/*"])
    assert profile.credentials["openai"].owner == "agency"


def test_extends_without_a_run_table_inherits_the_parents_run_settings(pdir: Path, agency: Path) -> None:
    profile = load(pdir, 'version = 1\nextends = "agency"\n')
    assert profile.run == load_profile("agency", [pdir]).run


def test_extends_run_settings_override_key_by_key(pdir: Path, agency: Path) -> None:
    profile = load(pdir, 'version = 1\nextends = "agency"\n[run]\ntimeout = "30m"\nnetwork = "open"\n')
    assert (profile.run.timeout, profile.run.network) == (1800.0, "open")
    assert (profile.run.max_requests, profile.run.env_keep) == (100, ("PATH", "HOME"))


def test_extends_env_set_merges_with_the_childs_values_winning(pdir: Path, agency: Path) -> None:
    profile = load(pdir, 'version = 1\nextends = "agency"\n[run]\nenv_set = { SHARED = "acme", OWN = "1" }\n')
    assert profile.run.env_set == {"AGENCY": "yes", "SHARED": "acme", "OWN": "1"}


def test_extends_hide_adds_to_the_parents_list(pdir: Path, agency: Path) -> None:
    profile = load(pdir, 'version = 1\nextends = "agency"\n[run]\nhide = ["~/.aws"]\n')
    assert profile.run.hide == ("~/.ssh", "~/.aws")


def test_extends_env_keep_replaces_the_parents_list(pdir: Path, agency: Path) -> None:
    profile = load(pdir, 'version = 1\nextends = "agency"\n[run]\nenv_keep = ["TERM"]\n')
    assert profile.run.env_keep == ("TERM",)


def test_extends_description_is_not_inherited(pdir: Path, agency: Path) -> None:
    assert load(pdir, 'version = 1\nextends = "agency"\n').description == ""


def test_extends_chains_through_several_profiles(pdir: Path, agency: Path) -> None:
    write(pdir, "region", 'version = 1\nextends = "agency"\n[credentials.mail]\nsecret = "keyring"\n'
                          'base_url = "https://mail.example.com"\n')
    profile = load(pdir, 'version = 1\nextends = "region"\n')
    assert {name: c.owner for name, c in profile.credentials.items()} == {
        "openai": "agency", "crm": "agency", "mail": "region"}
    assert profile.sources == (pdir / "acme.toml", pdir / "region.toml", agency)


def test_extends_finds_the_parent_along_the_same_lookup_path(tmp_path: Path) -> None:
    mine, shared = tmp_path / "mine", tmp_path / "shared"
    mine.mkdir()
    shared.mkdir()
    write(shared, "agency", AGENCY)
    write(mine, "acme", 'version = 1\nextends = "agency"\n')
    profile = load_profile("acme", [mine, shared])
    assert profile.sources == (mine / "acme.toml", shared / "agency.toml")


def test_extends_itself_is_a_cycle(pdir: Path) -> None:
    message = error(pdir, 'version = 1\nextends = "acme"\n')
    assert message == f"{pdir / 'acme.toml'}: extends: cycle acme -> acme. Remove one of the `extends` keys."


def test_extends_cycle_through_two_profiles_names_the_chain(pdir: Path) -> None:
    write(pdir, "agency", 'version = 1\nextends = "acme"\n')
    message = error(pdir, 'version = 1\nextends = "agency"\n')
    assert "extends: cycle acme -> agency -> acme. Remove one of the `extends` keys." in message


def test_extends_cycle_further_up_the_chain_names_the_whole_chain(pdir: Path) -> None:
    write(pdir, "b", 'version = 1\nextends = "c"\n')
    write(pdir, "c", 'version = 1\nextends = "b"\n')
    message = error(pdir, 'version = 1\nextends = "b"\n')
    assert message == f"{pdir / 'b.toml'}: extends: cycle acme -> b -> c -> b. Remove one of the `extends` keys."


def test_extends_a_missing_parent_names_this_file_the_key_and_the_fix(pdir: Path) -> None:
    message = error(pdir, 'version = 1\nextends = "nope"\n')
    assert message.startswith(f"{pdir / 'acme.toml'}: extends: unknown workspace 'nope': no nope.toml in {pdir}.")
    assert "Known workspaces: acme." in message
    assert "`outloop workspace new nope`" in message


@pytest.mark.parametrize(("value", "fragment"), [
    ('"Agency"', "'Agency' is not a valid workspace name"),
    ('"../agency"', "is not a valid workspace name"),
    ("1", "expected a string, got a number"),
    ('["agency"]', "expected a string, got a list"),
])
def test_extends_a_bad_value_names_this_file_and_key(pdir: Path, value: str, fragment: str) -> None:
    message = error(pdir, f"version = 1\nextends = {value}\n")
    assert message.startswith(f"{pdir / 'acme.toml'}: extends: ")
    assert fragment in message


def test_extends_an_invalid_parent_reports_the_parents_file(pdir: Path) -> None:
    write(pdir, "agency", with_run("timout = '1h'"))
    message = error(pdir, 'version = 1\nextends = "agency"\n')
    assert message.startswith(f"{pdir / 'agency.toml'}: run.timout: unknown key")


# ----- lookup order ---------------------------------------------------------------------------------------------


@pytest.fixture
def two_dirs(tmp_path: Path) -> tuple[Path, Path]:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    return first, second


def test_find_profile_takes_the_first_directory_that_has_the_file(two_dirs: tuple[Path, Path]) -> None:
    first, second = two_dirs
    write(first, "acme", "version = 1\n")
    write(second, "acme", "version = 1\n")
    assert find_profile("acme", [first, second]) == first / "acme.toml"
    assert find_profile("acme", [second, first]) == second / "acme.toml"


def test_find_profile_falls_through_to_later_directories(two_dirs: tuple[Path, Path]) -> None:
    first, second = two_dirs
    write(second, "acme", "version = 1\n")
    assert find_profile("acme", [first / "missing", first, second]) == second / "acme.toml"


def test_find_profile_ignores_a_directory_named_like_a_profile(two_dirs: tuple[Path, Path]) -> None:
    first, second = two_dirs
    (first / "acme.toml").mkdir()
    write(second, "acme", "version = 1\n")
    assert find_profile("acme", [first, second]) == second / "acme.toml"


def test_find_profile_unknown_workspace_lists_known_ones_and_the_fix(two_dirs: tuple[Path, Path]) -> None:
    first, second = two_dirs
    write(first, "globex", "version = 1\n")
    write(second, "acme", "version = 1\n")
    with pytest.raises(ProfileError) as caught:
        find_profile("initech", [first, second])
    assert caught.value.message == (
        f"unknown workspace 'initech': no initech.toml in {first}, {second}. Known workspaces: acme, globex. "
        "Create it with `outloop workspace new initech` or point --profiles / OUTLOOP_PROFILES at it."
    )


def test_find_profile_with_no_profiles_at_all_says_so(two_dirs: tuple[Path, Path]) -> None:
    with pytest.raises(ProfileError, match=r"No profiles were found there\."):
        find_profile("acme", list(two_dirs))


def test_available_workspaces_earlier_directories_shadow_later_ones(two_dirs: tuple[Path, Path]) -> None:
    first, second = two_dirs
    write(first, "acme", "version = 1\n")
    write(second, "acme", "version = 1\n")
    write(second, "globex", "version = 1\n")
    assert available_workspaces([first, second]) == {"acme": first / "acme.toml", "globex": second / "globex.toml"}


def test_available_workspaces_skip_missing_dirs_bad_names_and_other_files(two_dirs: tuple[Path, Path]) -> None:
    first, second = two_dirs
    write(first, "acme", "version = 1\n")
    for name in ("Bad.toml", "_hidden.toml", "notes.txt", "acme.toml.bak", "with space.toml"):
        (first / name).write_text("version = 1\n")
    (first / "dir.toml").mkdir()
    assert available_workspaces([second / "missing", first]) == {"acme": first / "acme.toml"}


def test_available_workspaces_agrees_with_find_profile(two_dirs: tuple[Path, Path]) -> None:
    first, second = two_dirs
    (first / "acme.toml").mkdir()
    write(second, "acme", "version = 1\n")
    write(first, "globex", "version = 1\n")
    dirs = [first, second]
    assert {name: find_profile(name, dirs) for name in available_workspaces(dirs)} == available_workspaces(dirs)


# ----- the repo's worked examples ---------------------------------------------------------------------------------


@pytest.mark.parametrize("workspace", ["agency", "acme", "globex"])
def test_repo_example_profiles_load(workspace: str) -> None:
    profile = load_profile(workspace, [REPO_PROFILES])
    assert profile.workspace == workspace
    assert profile.description


def test_repo_examples_are_the_workspaces_available() -> None:
    assert {"agency", "acme", "globex"} <= set(available_workspaces([REPO_PROFILES]))


def test_repo_agency_is_a_base_that_never_runs_and_its_clients_run() -> None:
    assert load_profile("agency", [REPO_PROFILES]).abstract is True
    assert set(runnable_workspaces([REPO_PROFILES])) >= {"acme", "globex"}
    assert "agency" not in runnable_workspaces([REPO_PROFILES])
    assert load_profile("acme", [REPO_PROFILES]).abstract is False


def test_repo_acme_and_globex_share_the_crm_host_with_different_rules() -> None:
    acme = load_profile("acme", [REPO_PROFILES]).credentials["crm"]
    globex = load_profile("globex", [REPO_PROFILES]).credentials["crm"]
    assert acme.host == globex.host == "api.hubapi.com"
    assert (acme.owner, globex.owner) == ("acme", "globex")
    assert {r.text for r in acme.allow} != {r.text for r in globex.allow}


def test_repo_globex_crm_is_read_only() -> None:
    globex = load_profile("globex", [REPO_PROFILES]).credentials["crm"]
    assert {rule.method for rule in globex.allow} == {"GET"}


@pytest.mark.parametrize("workspace", ["acme", "globex"])
def test_repo_clients_inherit_the_agency_openai_credential_owned_by_agency(workspace: str) -> None:
    profile = load_profile(workspace, [REPO_PROFILES])
    openai = profile.credentials["openai"]
    assert openai.owner == "agency"
    assert openai == load_profile("agency", [REPO_PROFILES]).credentials["openai"]
    assert profile.extends == "agency"
    assert profile.sources == (REPO_PROFILES / f"{workspace}.toml", REPO_PROFILES / "agency.toml")


@pytest.mark.parametrize(("workspace", "client"), [("acme", "acme"), ("globex", "globex")])
def test_repo_clients_tell_their_loop_who_they_are(workspace: str, client: str) -> None:
    assert load_profile(workspace, [REPO_PROFILES]).run.env_set["LOOP_CLIENT"] == client


def test_the_filesystem_view_keys_load_and_add_up_through_extends(pdir: Path) -> None:
    write(pdir, "base", 'version = 1\n[run]\nread = ["/srv/shared"]\nwrite = ["~/cache"]\n')
    profile = load(pdir, 'version = 1\nextends = "base"\n[run]\nfilesystem = "host"\nread = ["~/data"]\n')
    assert profile.run.filesystem == "host"
    assert profile.run.read == ("/srv/shared", "~/data") and profile.run.write == ("~/cache",)
    assert load(pdir, "version = 1\n").run.filesystem == "workspace"


@pytest.mark.parametrize(("lines", "key", "problem"), [
    ('filesystem = "none"', "run.filesystem", "expected one of workspace, host"),
    ('read = ["data"]', "run.read", "not an absolute path: write /srv/data or ~/data"),
    ('write = ["/"]', "run.write", 'set run.filesystem = "host" instead'),
    ('write = "/srv"', "run.write", "list"),
])
def test_bad_filesystem_view_keys_name_the_key_and_the_fix(pdir: Path, lines: str, key: str, problem: str) -> None:
    message = error(pdir, with_run(lines))
    assert key in message and problem in message, message
