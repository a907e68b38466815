"""Virtual key format: generation, parsing and hashing (pure, no I/O).

A key looks like ``tgk_Ab12Cd34_<38 random><6 checksum>``. The fixed ``tgk_``
start and the CRC32 checksum let secret scanners find leaked keys and let the
gateway reject mistyped ones without a lookup. ``tgk_Ab12Cd34`` is the visible
prefix, stored and shown; only the SHA-256 of the whole key is kept. The keys
are random with 220+ bits of entropy, so a fast hash is enough.
"""

import hashlib
import hmac
import secrets
import string
import zlib
from dataclasses import dataclass

KEY_SCHEME = "tgk"
_ALPHABET = string.digits + string.ascii_letters
_ID_LENGTH = 8
_BODY_LENGTH = 38
_CHECKSUM_LENGTH = 6
KEY_LENGTH = len(KEY_SCHEME) + 1 + _ID_LENGTH + 1 + _BODY_LENGTH + _CHECKSUM_LENGTH


@dataclass(frozen=True, slots=True)
class GeneratedKey:
    plaintext: str  # shown once, never stored
    prefix: str
    secret_hash: str


def _base62(number: int, length: int) -> str:
    digits = []
    for _ in range(length):
        number, remainder = divmod(number, 62)
        digits.append(_ALPHABET[remainder])
    return "".join(reversed(digits))


def _checksum(payload: str) -> str:
    return _base62(zlib.crc32(payload.encode()), _CHECKSUM_LENGTH)


def hash_key(plaintext: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


def generate_key(scheme: str = KEY_SCHEME) -> GeneratedKey:
    """A new random key with its visible prefix and hash; `scheme` is its fixed start
    (three letters: "tgk" for virtual keys, "tgm" for management API tokens)."""
    key_id = "".join(secrets.choice(_ALPHABET) for _ in range(_ID_LENGTH))
    body = "".join(secrets.choice(_ALPHABET) for _ in range(_BODY_LENGTH))
    prefix = f"{scheme}_{key_id}"
    payload = f"{prefix}_{body}"
    plaintext = payload + _checksum(payload)
    return GeneratedKey(plaintext=plaintext, prefix=prefix, secret_hash=hash_key(plaintext))


def key_prefix(presented: str, scheme: str = KEY_SCHEME) -> str | None:
    """The prefix of a well-formed key of `scheme` with a valid checksum, else None."""
    if len(presented) != KEY_LENGTH or not presented.startswith(scheme + "_"):
        return None
    payload, checksum = presented[:-_CHECKSUM_LENGTH], presented[-_CHECKSUM_LENGTH:]
    if not hmac.compare_digest(_checksum(payload), checksum):
        return None
    return presented[: len(scheme) + 1 + _ID_LENGTH]


def key_matches(presented: str, secret_hash: str) -> bool:
    """Whether `presented` is the key behind `secret_hash`, in constant time."""
    return hmac.compare_digest(hash_key(presented), secret_hash)
