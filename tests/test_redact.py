"""Spec for outloop_cli.broker.redact: secrets an upstream echoes back are masked, however the stream is cut."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outloop_cli.broker.redact import StreamRedactor, basic_auth_variant, redact_text, secret_variants

SECRET = "sk-live-4f9a/b+c=d"  # '/', '+', '=' make the URL-encoded and base64 forms differ from the raw one
VARIANTS = secret_variants([SECRET])


def stream(variants: tuple[bytes, ...], chunks: Sequence[bytes]) -> bytes:
    redactor = StreamRedactor(variants)
    return b"".join(redactor.feed(chunk) for chunk in chunks) + redactor.flush()


def masked_reference(data: bytes, variants: Sequence[bytes]) -> bytes:
    """What a correct masker outputs: every byte inside any occurrence of any variant becomes '*'."""
    covered = [False] * len(data)
    for variant in variants:
        for start in range(len(data) - len(variant) + 1):
            if data[start:start + len(variant)] == variant:
                covered[start:start + len(variant)] = [True] * len(variant)
    return bytes(ord("*") if hit else byte for byte, hit in zip(data, covered, strict=True))


def stars(text: bytes | str) -> bytes:
    return b"*" * len(text.encode() if isinstance(text, str) else text)


# ----- secret_variants ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", [
    SECRET.encode(),
    quote(SECRET, safe="").encode(),
    base64.b64encode(SECRET.encode()),
    base64.urlsafe_b64encode(SECRET.encode()),
])
def test_variants_include_raw_url_encoded_and_base64_forms(form: bytes) -> None:
    assert form in VARIANTS


@pytest.mark.parametrize("secret", ['quo"te', "back\\slash", "tab\there", "é-unicode", "</script>"])
def test_variants_include_the_json_escaped_form(secret: str) -> None:
    assert json.dumps(secret)[1:-1].encode() in secret_variants([secret])


def test_variants_are_longest_first_so_a_containing_form_is_masked_whole() -> None:
    variants = secret_variants(["abc", "abcdef", "x"])
    assert [len(v) for v in variants] == sorted((len(v) for v in variants), reverse=True)


def test_variants_are_unique_and_skip_empty_values() -> None:
    variants = secret_variants(["plain", "", "plain"])
    assert len(variants) == len(set(variants))
    assert b"" not in variants


def test_variants_of_no_secrets_are_empty() -> None:
    assert secret_variants([]) == ()


def test_basic_auth_variant_is_the_base64_of_user_colon_secret() -> None:
    assert base64.b64decode(basic_auth_variant("api", "s3cret")) == b"api:s3cret"


# ----- StreamRedactor: whole chunks ------------------------------------------------------------------------------


@pytest.mark.parametrize("form", VARIANTS)
def test_stream_masks_every_variant_in_one_chunk(form: bytes) -> None:
    body = b'{"echo": "' + form + b'"}'
    assert stream(VARIANTS, [body]) == b'{"echo": "' + stars(form) + b'"}'


@pytest.mark.parametrize("form", VARIANTS)
def test_stream_keeps_the_byte_length(form: bytes) -> None:
    body = b"a" + form + b"b" + form + b"c"
    assert len(stream(VARIANTS, [body])) == len(body)


def test_stream_masks_every_occurrence_and_counts_them() -> None:
    redactor = StreamRedactor(VARIANTS)
    body = (SECRET + " and " + SECRET + " again " + SECRET).encode()
    out = redactor.feed(body) + redactor.flush()
    assert SECRET.encode() not in out
    assert redactor.masked == 3


def test_stream_without_variants_passes_chunks_through_untouched() -> None:
    redactor = StreamRedactor(())
    assert redactor.feed(b"anything") == b"anything"
    assert redactor.flush() == b""


def test_stream_masks_an_empty_chunk_to_nothing() -> None:
    redactor = StreamRedactor(VARIANTS)
    assert redactor.feed(b"") == b""
    assert redactor.flush() == b""


# ----- StreamRedactor: split points ----------------------------------------------------------------------------

BODY = b'data: {"token": "' + SECRET.encode() + b'"}\n\n'
EXPECTED = b'data: {"token": "' + stars(SECRET) + b'"}\n\n'


@pytest.mark.parametrize("split", range(len(BODY) + 1))
def test_stream_masks_a_secret_split_at_any_point(split: int) -> None:
    assert stream(VARIANTS, [BODY[:split], BODY[split:]]) == EXPECTED


def test_stream_masks_a_secret_split_at_every_pair_of_points() -> None:
    for first in range(len(BODY) + 1):
        for second in range(first, len(BODY) + 1):
            assert stream(VARIANTS, [BODY[:first], BODY[first:second], BODY[second:]]) == EXPECTED


@pytest.mark.parametrize("form", VARIANTS)
def test_stream_masks_every_variant_fed_byte_by_byte(form: bytes) -> None:
    body = b"prefix " + form + b" suffix"
    assert stream(VARIANTS, [bytes([b]) for b in body]) == b"prefix " + stars(form) + b" suffix"


@pytest.mark.parametrize("form", VARIANTS)
@pytest.mark.parametrize("split", [1, 2, 5, -1, -2])
def test_stream_masks_every_variant_split_inside_it(form: bytes, split: int) -> None:
    assert stream(VARIANTS, [b"x" + form[:split], form[split:] + b"y"]) == b"x" + stars(form) + b"y"


def test_stream_masks_back_to_back_secrets_across_chunks() -> None:
    body = (SECRET * 3).encode()
    for split in range(len(body) + 1):
        assert stream(VARIANTS, [body[:split], body[split:]]) == stars(body)


# ----- StreamRedactor: no delay ------------------------------------------------------------------------------


@pytest.mark.parametrize("event", [
    b"data: {\"choices\": [{\"delta\": {\"content\": \"Hello\"}}]}\n\n",
    b"event: ping\ndata: {}\n\n",
    b": keep-alive\n\n",
    b"data: [DONE]\n\n",
])
def test_stream_passes_sse_events_through_at_once(event: bytes) -> None:
    redactor = StreamRedactor(VARIANTS)
    assert redactor.feed(event) == event


def test_stream_passes_text_that_cannot_start_a_secret_without_holding_back() -> None:
    redactor = StreamRedactor(secret_variants(["zzz-secret"]))
    assert redactor.feed(b"hello wor") == b"hello wor"
    assert redactor.feed(b"ld") == b"ld"


@pytest.mark.parametrize("tail", [b"z", b"zz", b"zzz-", b"zzz-secre"])
def test_stream_holds_back_only_a_tail_that_could_start_a_secret(tail: bytes) -> None:
    redactor = StreamRedactor(secret_variants(["zzz-secret"]))
    assert redactor.feed(b"hello " + tail) == b"hello "


def test_stream_releases_a_held_back_tail_once_it_cannot_be_a_secret() -> None:
    redactor = StreamRedactor(secret_variants(["zzz-secret"]))
    assert redactor.feed(b"buzz") == b"bu"
    assert redactor.feed(b"er\n") == b"zzer\n"


def test_stream_flush_returns_a_held_back_tail_unmasked_when_the_body_ends() -> None:
    redactor = StreamRedactor(secret_variants(["zzz-secret"]))
    assert redactor.feed(b"fizz") == b"fi"
    assert redactor.flush() == b"zz"
    assert redactor.flush() == b""


def test_stream_redactor_output_never_exceeds_its_input_so_far() -> None:
    redactor = StreamRedactor(VARIANTS)
    fed = emitted = 0
    for byte in BODY:
        fed += 1
        emitted += len(redactor.feed(bytes([byte])))
        assert emitted <= fed
    assert emitted + len(redactor.flush()) == fed


# ----- StreamRedactor: overlapping variants --------------------------------------------------------------------


@pytest.mark.parametrize(("secrets", "body"), [
    (["abcdef", "cd"], b"xabcdefy"),  # one secret inside another
    (["abcde", "defgh"], b"xabcdefghy"),  # two secrets overlapping
    (["abc", "bcd", "cde"], b"-abcde-"),  # a chain of overlaps
    (["abab"], b"-ababab-"),  # a secret overlapping itself
    (["zab", "abcdef"], b"zabcdef"),  # the shorter secret ends inside the longer one
    (["zab", "abcdef"], b"zabx"),  # a complete secret whose tail could also start another
    (["abc", "abc"], b"abcabc"),  # the same secret twice
])
def test_stream_masks_overlapping_secrets_whole_at_every_split(secrets: list[str], body: bytes) -> None:
    variants = tuple(v for v in secret_variants(secrets))
    expected = masked_reference(body, variants)
    assert stream(variants, [body]) == expected
    for split in range(len(body) + 1):
        assert stream(variants, [body[:split], body[split:]]) == expected, split
    assert stream(variants, [bytes([b]) for b in body]) == expected


def test_stream_masks_a_longer_secret_whose_middle_is_another_secret_when_split_after_it() -> None:
    variants = secret_variants(["abcdef", "cd"])
    assert stream(variants, [b"abcd", b"ef"]) == b"******"


def test_stream_masks_a_secret_that_contains_the_mask_character() -> None:
    variants = secret_variants(["**a"])
    assert stream(variants, [b"**a", b"a"]) == b"***a"


# ----- redact_text (headers) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("form", VARIANTS)
def test_redact_text_masks_every_variant_in_a_header_value(form: bytes) -> None:
    value = "Bearer " + form.decode()
    assert redact_text(value, VARIANTS) == "Bearer " + "*" * len(form)


def test_redact_text_masks_overlapping_secrets_whole() -> None:
    assert redact_text("abcdefg", secret_variants(["abcde", "efg"])) == "*******"


def test_redact_text_leaves_other_values_alone_even_with_undecodable_bytes() -> None:
    value = b"caf\xe9; token=x".decode("latin-1")
    assert redact_text(value, VARIANTS) == value


def test_redact_text_masks_a_unicode_secret_by_its_utf8_bytes() -> None:
    variants = secret_variants(["pässwörd"])
    out = redact_text("x pässwörd y", variants)
    assert "pässwörd" not in out
    assert out.startswith("x ") and out.endswith(" y")


# ----- property: chunking never changes the result ----------------------------------------------------------

SECRET_CHARS = "abcxyz019-_./+=:\"\\ é"  # no '*': a secret made of mask characters could not be told apart
TEXT_CHARS = "abcxyz019-_ \n:{}\"%2F="


@st.composite
def bodies_with_secrets(draw: st.DrawFn) -> tuple[tuple[bytes, ...], bytes, list[bytes]]:
    secrets = draw(st.lists(st.text(SECRET_CHARS, min_size=1, max_size=12), min_size=1, max_size=3))
    variants = secret_variants(secrets)
    pieces = draw(st.lists(st.one_of(st.text(TEXT_CHARS, max_size=15).map(str.encode), st.sampled_from(variants),
                                     st.sampled_from(variants).map(lambda v: v[: max(1, len(v) // 2)])),
                           max_size=8))
    body = b"".join(pieces)
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=10)))
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    return variants, body, chunks


@settings(max_examples=300, deadline=None)
@given(bodies_with_secrets())
def test_property_any_chunking_gives_the_one_shot_result_and_no_secret(
    case: tuple[tuple[bytes, ...], bytes, list[bytes]],
) -> None:
    variants, body, chunks = case
    out = stream(variants, chunks)
    assert out == stream(variants, [body])
    assert out == masked_reference(body, variants)
    assert len(out) == len(body)
    for variant in variants:
        assert variant not in out
