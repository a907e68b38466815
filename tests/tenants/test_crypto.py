"""Provider credentials are encrypted at rest and survive key rotation."""

import pytest
from cryptography.fernet import Fernet
from django.db import connection
from pytest_django import Settings

from routing.models import Provider
from tenants.crypto import SecretUnreadable, decrypt_secret, encrypt_secret, reencrypt_secret

PROVIDER_SECRET = "sk-live-4f9a1c7e2b8d0e6f3a5c9b1d7e2f4a6c"


def new_fernet_key() -> str:
    return Fernet.generate_key().decode()


def test_provider_api_key_is_stored_encrypted_and_read_back(db: None) -> None:
    provider = Provider(
        name="openai", kind=Provider.Kind.OPENAI, base_url="https://api.openai.com/v1"
    )
    provider.set_api_key(PROVIDER_SECRET)
    provider.save()

    table = connection.ops.quote_name(Provider._meta.db_table)
    column = connection.ops.quote_name(Provider._meta.get_field("api_key_encrypted").column)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {column} FROM {table} WHERE id = %s", [provider.pk])
        (raw,) = cursor.fetchone()

    assert raw
    assert PROVIDER_SECRET not in raw
    assert "4f9a1c7e2b8d" not in raw
    assert Provider.objects.get(pk=provider.pk).api_key() == PROVIDER_SECRET


def test_encrypting_the_same_secret_twice_gives_different_tokens() -> None:
    assert encrypt_secret(PROVIDER_SECRET) != encrypt_secret(PROVIDER_SECRET)


def test_secret_encrypted_under_the_old_key_still_decrypts_after_a_new_key_is_added(
    settings: Settings,
) -> None:
    old, new = new_fernet_key(), new_fernet_key()
    settings.TOLLGATE_ENCRYPTION_KEYS = [old]
    token = encrypt_secret(PROVIDER_SECRET)

    settings.TOLLGATE_ENCRYPTION_KEYS = [new, old]

    assert decrypt_secret(token) == PROVIDER_SECRET


def test_reencrypted_secret_decrypts_under_the_new_key_alone(settings: Settings) -> None:
    old, new = new_fernet_key(), new_fernet_key()
    settings.TOLLGATE_ENCRYPTION_KEYS = [old]
    token = encrypt_secret(PROVIDER_SECRET)
    settings.TOLLGATE_ENCRYPTION_KEYS = [new, old]

    rotated = reencrypt_secret(token)

    settings.TOLLGATE_ENCRYPTION_KEYS = [new]
    assert decrypt_secret(rotated) == PROVIDER_SECRET
    with pytest.raises(SecretUnreadable):
        decrypt_secret(token)  # the old token really needed the old key


def test_secret_under_an_unconfigured_key_is_unreadable_without_leaking_it(
    settings: Settings,
) -> None:
    settings.TOLLGATE_ENCRYPTION_KEYS = [new_fernet_key()]
    token = encrypt_secret(PROVIDER_SECRET)
    settings.TOLLGATE_ENCRYPTION_KEYS = [new_fernet_key()]

    with pytest.raises(SecretUnreadable) as excinfo:
        decrypt_secret(token)

    message = str(excinfo.value)
    assert message
    assert PROVIDER_SECRET not in message
    assert token not in message
    assert token[:20] not in message
    # Not chained to the library error either, so tracebacks carry nothing more.
    assert excinfo.value.__cause__ is None and excinfo.value.__suppress_context__


def test_reencrypting_under_an_unconfigured_key_is_unreadable(settings: Settings) -> None:
    settings.TOLLGATE_ENCRYPTION_KEYS = [new_fernet_key()]
    token = encrypt_secret(PROVIDER_SECRET)
    settings.TOLLGATE_ENCRYPTION_KEYS = [new_fernet_key()]

    with pytest.raises(SecretUnreadable) as excinfo:
        reencrypt_secret(token)

    assert token not in str(excinfo.value)
