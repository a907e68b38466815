"""Virtual key format: what a key looks like, how typos are caught, how it is stored."""

import re
import string
from collections.abc import Callable

import pytest

from tenants import keys
from tenants.keys import KEY_LENGTH, generate_key, hash_key, key_matches, key_prefix

ALPHABET = string.digits + string.ascii_letters
KEY_SHAPE = re.compile(r"tgk_[0-9A-Za-z]{8}_[0-9A-Za-z]{44}")


def resigned(payload: str) -> str:
    """`payload` with a valid checksum appended, to isolate the other checks."""
    return payload + keys._checksum(payload)


def test_key_starts_with_scheme_and_an_eight_character_id() -> None:
    generated = generate_key()

    assert KEY_SHAPE.fullmatch(generated.plaintext)
    assert generated.prefix == generated.plaintext[:12]
    assert re.fullmatch(r"tgk_[0-9A-Za-z]{8}", generated.prefix)


def test_every_key_has_the_same_length() -> None:
    assert KEY_LENGTH == 57
    assert {len(generate_key().plaintext) for _ in range(200)} == {KEY_LENGTH}


def test_a_generated_key_parses_to_its_prefix() -> None:
    generated = generate_key()

    assert key_prefix(generated.plaintext) == generated.prefix


def test_checksum_rejects_a_one_character_typo_at_every_position() -> None:
    plaintext = generate_key().plaintext
    accepted = []
    for position, original in enumerate(plaintext):
        for replacement in ALPHABET + "_-":
            if replacement == original:
                continue
            typo = plaintext[:position] + replacement + plaintext[position + 1 :]
            if key_prefix(typo) is not None:
                accepted.append(typo)

    assert accepted == []


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda key: key[:-1], id="one-character-short"),
        pytest.param(lambda key: key + "0", id="one-character-long"),
        pytest.param(lambda key: "", id="empty"),
        pytest.param(lambda key: key[: len(key) // 2], id="truncated"),
        pytest.param(lambda key: " " + key, id="leading-space"),
        pytest.param(lambda key: key.upper(), id="upper-cased"),
    ],
)
def test_malformed_key_has_no_prefix(mangle: Callable[[str], str]) -> None:
    assert key_prefix(mangle(generate_key().plaintext)) is None


def test_key_of_another_scheme_has_no_prefix_even_with_a_valid_checksum() -> None:
    payload = generate_key().plaintext[: -len(keys._checksum(""))]
    other_scheme = resigned("tgx" + payload[3:])

    assert len(other_scheme) == KEY_LENGTH
    assert key_prefix(other_scheme) is None
    assert key_prefix(resigned(payload)) is not None  # the re-signing itself is sound


def test_key_with_a_wrong_checksum_has_no_prefix() -> None:
    plaintext = generate_key().plaintext
    checksum_length = len(keys._checksum(""))
    wrong = plaintext[:-checksum_length] + "0" * checksum_length
    if wrong == plaintext:  # one in 62**6
        wrong = plaintext[:-checksum_length] + "1" * checksum_length

    assert key_prefix(wrong) is None


def test_key_matches_only_its_own_hash() -> None:
    generated = generate_key()
    other = generate_key()

    assert key_matches(generated.plaintext, generated.secret_hash)
    assert not key_matches(other.plaintext, generated.secret_hash)
    assert not key_matches(generated.plaintext[:-1], generated.secret_hash)
    assert not key_matches(generated.prefix, generated.secret_hash)
    assert not key_matches("", generated.secret_hash)


def test_hash_is_sha256_hex_and_never_the_key() -> None:
    generated = generate_key()

    assert re.fullmatch(r"[0-9a-f]{64}", generated.secret_hash)
    assert generated.secret_hash == hash_key(generated.plaintext)
    assert generated.plaintext not in generated.secret_hash
    assert generated.secret_hash != generated.plaintext
    # A known vector, so a silent change of algorithm is noticed.
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_a_thousand_generated_keys_are_all_distinct() -> None:
    generated = [generate_key() for _ in range(1_000)]

    assert len({key.plaintext for key in generated}) == 1_000
    assert len({key.prefix for key in generated}) == 1_000
    assert len({key.secret_hash for key in generated}) == 1_000
