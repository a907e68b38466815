"""Encryption at rest for secrets Tollgate must read back (provider credentials).

Fernet (AES-128-CBC + HMAC-SHA256) under a MultiFernet: the first key in
settings.TOLLGATE_ENCRYPTION_KEYS encrypts, every listed key decrypts, so keys
rotate without downtime (add a new first key, re-encrypt, drop the old one).
"""

from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings


class SecretUnreadable(Exception):
    """A stored secret cannot be decrypted with any configured key."""


_UNREADABLE = "The secret was encrypted with a key that is not configured."


@lru_cache(maxsize=4)
def _fernet(keys: tuple[str, ...]) -> MultiFernet:
    return MultiFernet([Fernet(key.encode()) for key in keys])


def _current() -> MultiFernet:
    return _fernet(tuple(settings.TOLLGATE_ENCRYPTION_KEYS))


def encrypt_secret(plaintext: str) -> str:
    """Ciphertext for `plaintext` under the primary key."""
    return _current().encrypt(plaintext.encode()).decode()


def decrypt_secret(ciphertext: str) -> str:
    """The plaintext behind `ciphertext`; raises SecretUnreadable, never leaks it."""
    try:
        return _current().decrypt(ciphertext.encode()).decode()
    except InvalidToken:
        raise SecretUnreadable(
            "The secret was encrypted with a key that is not configured."
        ) from None


def reencrypt_secret(ciphertext: str) -> str:
    """The same secret, encrypted under the primary key (for key rotation)."""
    try:
        return _current().rotate(ciphertext.encode()).decode()
    except InvalidToken:
        raise SecretUnreadable(
            "The secret was encrypted with a key that is not configured."
        ) from None
