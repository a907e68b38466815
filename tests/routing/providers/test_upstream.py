"""The process's shared upstream session, against a real provider-like host."""

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from aiohttp import web

from routing.providers.openai import OpenAIAdapter
from routing.providers.upstream import upstream_session
from tests.routing.providers.test_openai import chat_for, deployment_for

COOKIES = web.AppKey("cookies", list[str])  # the Cookie header of each request received


async def _chat_setting_a_cookie(request: web.Request) -> web.Response:
    request.app[COOKIES].append(request.headers.get("cookie", ""))
    response = web.json_response(
        {
            "id": "c-1",
            "object": "chat.completion",
            "created": 1,
            "model": "m",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "hi"},
                 "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
    )  # fmt: skip
    # As a provider's load balancer or bot filter does (Cloudflare's __cf_bm, say).
    response.set_cookie("session", "tenant-a-affinity", path="/")
    return response


@pytest_asyncio.fixture
async def cookie_host() -> AsyncIterator[tuple[str, list[str]]]:
    app = web.Application()
    app[COOKIES] = cookies = []
    app.router.add_post("/v1/chat/completions", _chat_setting_a_cookie)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    # By name: aiohttp's default jar ignores cookies from IP-address hosts anyway.
    yield f"http://localhost:{port}/v1", cookies
    await runner.cleanup()


@pytest.mark.asyncio
async def test_a_cookie_one_call_gets_is_not_sent_on_the_next(
    cookie_host: tuple[str, list[str]], settings: object
) -> None:
    base_url, cookies = cookie_host
    settings.TOLLGATE_PROVIDER_ALLOW_PRIVATE_NETWORKS = True  # type: ignore[attr-defined]
    session = upstream_session()
    try:
        adapter = OpenAIAdapter(session)
        # Two calls on the one shared session, as two tenants' requests would make them.
        for _ in range(2):
            reply = await adapter.chat(deployment_for(base_url), chat_for(), request_id="r")
            assert reply.usage.output_tokens == 1
    finally:
        await session.close()
    assert cookies == ["", ""]
