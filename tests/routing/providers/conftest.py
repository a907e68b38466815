"""Fixtures shared by the adapter tests: the mock's root URL and an HTTP session."""

from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio


@pytest.fixture
def mock_root(mock_url: str) -> str:
    """The mock provider's root URL (Anthropic, Azure and Gemini base URLs have no /v1)."""
    return mock_url.removesuffix("/v1")


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session
