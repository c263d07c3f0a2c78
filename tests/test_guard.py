"""The wrong-client guard without sockets: which identifiers a run guards against, and how text is scanned."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from outloop_cli.broker.admission import Admitted, Denial, admit
from outloop_cli.broker.guard import StreamScanner, body_texts, held_body, masked_path, request_texts
from outloop_cli.errors import ProfileError
from outloop_cli.guard import Guard, Identifier, declared_identifiers, load_guard, overlapping_identifiers
from outloop_cli.policy import normalise_path
from outloop_cli.profiles import GuardSettings, load_profile

CREDENTIAL = '[credentials.crm]\nsecret = "keyring"\nbase_url = "https://crm.example"\nallow = ["* /**"]\n'


def _profiles(tmp_path: Path, **extra: str) -> Path:
    """Profiles named by keyword; each text holds top-level keys and tables that go before the credential."""
    for name, text in {"agency": "", "acme": 'extends = "agency"\n', "globex": "", "initech": "", **extra}.items():
        (tmp_path / f"{name}.toml").write_text(f"version = 1\n{textwrap.dedent(text)}\n{CREDENTIAL}")
    return tmp_path


def _guard(*texts: str) -> Guard:
    return Guard([Identifier("globex", index, text) for index, text in enumerate(texts)], GuardSettings())


def test_matching_is_literal_and_ignores_case() -> None:
    guard = _guard("globex.example", "GLX-", "cus_Globex")
    assert guard.search(["Lead: BOB@Globex.Example"]) == Identifier("globex", 0, "globex.example")
    assert guard.search(["ref glx-17"]) == Identifier("globex", 1, "GLX-")
    assert guard.search(["CUS_GLOBEX_1"]) == Identifier("globex", 2, "cus_Globex")
    assert guard.search(["globexXexample", "glx_17", "g.l.x-"]) is None  # literal: '.' is not a wildcard


def test_bodies_are_read_in_the_spellings_a_server_reads() -> None:
    guard = _guard("globex.example")
    for body in (b'{"e": "bob@globex\\u002eexample"}', b"e=bob%40globex.example", b"e=bob@globex%2Eexample",
                 b'["x", "GLOBEX.EXAMPLE"]'):
        assert guard.search(body_texts(body)) is not None, body
    assert guard.search(body_texts(b'{"e": "bob@acme.example"}')) is None
    assert guard.search(body_texts(b"\xff\xfe not utf-8 but globex.example")) is not None


def test_path_and_query_are_scanned_decoded_and_the_audited_path_is_masked() -> None:
    guard = _guard("globex.example")
    path = normalise_path("/crm/leads/bob@globex.example/notes")
    assert guard.search(request_texts(path, "")) is not None
    assert masked_path(path, guard) == "/crm/leads/[guarded]/notes"
    clean = normalise_path("/crm/leads/1")
    assert guard.search(request_texts(clean, "q=bob%40GLOBEX.example")) is not None
    assert guard.search(request_texts(clean, "q=bob+at+acme")) is None


def test_a_streamed_response_is_matched_across_chunk_boundaries() -> None:
    guard = _guard("globex.example")
    scanner = StreamScanner(guard)
    for chunk in (b'{"owner": "bob@glo', b"BEX.exa", b'mple"}'):
        scanner.feed(chunk)
    assert scanner.found == Identifier("globex", 0, "globex.example")
    clean = StreamScanner(guard)
    for chunk in (b"globex", b".", b"examp", b"le"[:1]):
        clean.feed(chunk)
    assert clean.found is None
    split_utf8 = StreamScanner(_guard("glöbex"))
    for chunk in ("glö".encode()[:3], "glö".encode()[3:] + b"bex"):
        split_utf8.feed(chunk)
    assert split_utf8.found is not None


def test_a_held_body_stops_reading_past_the_limit() -> None:
    async def chunks(total: int) -> AsyncIterator[bytes]:
        for _ in range(total):
            yield b"x" * 100

    assert asyncio.run(held_body(chunks(3), 300)) == b"x" * 300
    assert asyncio.run(held_body(chunks(4), 300)) is None


def test_a_run_guards_against_other_workspaces_only(tmp_path: Path) -> None:
    dirs = [_profiles(tmp_path, acme='extends = "agency"\n[guard]\nidentifiers = ["acme.example", "shared.example"]\n',
                      agency='[guard]\nidentifiers = ["agency-internal"]\n',
                      globex='[guard]\nidentifiers = ["globex.example", "SHARED.example"]\n')]
    guard = load_guard(load_profile("acme", dirs), dirs)
    assert guard is not None
    # Not its own, not its base's, and not one it declares itself (workspace check warns about that one).
    assert [item.text for item in guard.identifiers] == ["globex.example"]
    globex_guard = load_guard(load_profile("globex", dirs), dirs)
    assert globex_guard is not None
    assert sorted(item.text for item in globex_guard.identifiers) == ["acme.example", "agency-internal"]
    (tmp_path / "plain").mkdir()
    plain = [_profiles(tmp_path / "plain")]
    assert load_guard(load_profile("acme", plain), plain) is None  # nobody declared any: the guard is off


def test_an_unreadable_guard_table_elsewhere_stops_the_run_rather_than_guarding_less(tmp_path: Path) -> None:
    dirs = [_profiles(tmp_path, globex="[guard]\nidentifiers = 'globex.example'\n")]
    with pytest.raises(ProfileError, match=r"globex.toml: guard.identifiers: expected a list of strings"):
        load_guard(load_profile("acme", dirs), dirs)
    (tmp_path / "globex.toml").write_text("version = 1\n[guard\n")
    with pytest.raises(ProfileError, match=r"globex\.toml: not valid TOML"):
        load_guard(load_profile("acme", dirs), dirs)


@pytest.mark.parametrize(("guard", "message"), [
    ('identifiers = ["ab"]', "guard.identifiers[0]: 'ab': an identifier is at least 3 characters"),
    ('identifiers = [" acme"]', "guard.identifiers[0]"),
    ('responses = "block"', "guard.responses: expected one of flag, deny, got 'block'"),
    ('max_body = "lots"', "guard.max_body: 'lots' is not a size"),
    ('identifier = ["acme"]', "guard.identifier: unknown key; did you mean `identifiers`?"),
])
def test_guard_mistakes_name_the_key_and_the_fix(tmp_path: Path, guard: str, message: str) -> None:
    dirs = [_profiles(tmp_path, globex=f"[guard]\n{guard}\n")]
    with pytest.raises(ProfileError) as caught:
        load_profile("globex", dirs)
    assert message in caught.value.message


def test_overlapping_identifiers_across_workspaces_are_found(tmp_path: Path) -> None:
    dirs = [_profiles(tmp_path, acme='[guard]\nidentifiers = ["acme.example", "ACME-"]\n',
                      globex='[guard]\nidentifiers = ["globex.example", "acme-corp"]\n',
                      initech='[guard]\nidentifiers = ["initech.example", "acme-"]\n')]
    overlaps = overlapping_identifiers(declared_identifiers(dirs))
    assert sorted((o.first.rule, o.second.rule) for o in overlaps) == [
        ("acme: guard.identifiers[1]", "globex: guard.identifiers[1]"),
        ("acme: guard.identifiers[1]", "initech: guard.identifiers[1]"),
        ("globex: guard.identifiers[1]", "initech: guard.identifiers[1]")]


def test_admission_refuses_a_foreign_identifier_only_after_the_policy_allowed_the_request(tmp_path: Path) -> None:
    dirs = [_profiles(tmp_path, globex='[guard]\nidentifiers = ["globex.example"]\n')]
    profile = load_profile("acme", dirs)
    guard = load_guard(profile, dirs)
    refused = admit("GET", "/v1/http/crm/leads/x@globex.example", profile, guard)
    assert isinstance(refused, Denial)
    assert (refused.status, refused.reason, refused.rule, refused.path) == (
        403, "foreign_identifier", "globex: guard.identifiers[0]", "/leads/[guarded]")
    assert "globex" not in refused.message  # the child is not told which client it hit
    assert isinstance(admit("GET", "/v1/http/crm/leads/x@acme.example", profile, guard), Admitted)
    unguarded = admit("GET", "/v1/http/crm/leads/x@globex.example", profile, None)
    assert isinstance(unguarded, Admitted)  # the control: without the guard it would have gone out
