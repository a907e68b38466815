"""The Azure OpenAI adapter, against the built-in mock's /openai/deployments endpoints."""

import base64
import struct
from typing import Any

import aiohttp
import httpx
import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from billing.contracts import TokenUsage
from routing.contracts import ChatRequest, DeploymentSpec, EmbeddingsRequest
from routing.errors import UpstreamError, UpstreamRateLimited, UpstreamRejected
from routing.mockprovider.content import completion_words, embedding_vector
from routing.providers.azure import AzureOpenAIAdapter
from routing.providers.openai import OpenAIAdapter

API_KEY = "azure-test-secret-0123456789"
API_VERSION = "2024-10-21"
QUESTION = "Tell me about the mountains"
PROMPT = [{"role": "user", "content": QUESTION}]
PROMPT_TOKENS = 5 + 3


@pytest.fixture
def adapter(session: aiohttp.ClientSession) -> AzureOpenAIAdapter:
    return AzureOpenAIAdapter(session)


def deployment_for(
    mock_root: str, deployment: str = "gpt-4o-prod", *, api_version: str = API_VERSION
) -> DeploymentSpec:
    return DeploymentSpec(
        deployment_id=1,
        name="azure-deployment",
        provider_id=1,
        provider_kind="azure",
        base_url=f"{mock_root}/",
        api_key=API_KEY,
        api_version=api_version,
        upstream_model=deployment,
        weight=1,
        priority=0,
        connect_timeout_s=5.0,
        ttft_timeout_s=10.0,
        read_timeout_s=10.0,
        total_timeout_s=30.0,
    )


def chat_for(payload: dict[str, Any], *, stream: bool = False, usage: bool = False) -> ChatRequest:
    body = {"model": "azure-gpt", "messages": PROMPT, **payload}
    if stream:
        body["stream"] = True
        if usage:
            body["stream_options"] = {"include_usage": True}
    return ChatRequest(model="azure-gpt", payload=body, stream=stream, include_usage=usage)


def last_request(mock_root: str) -> dict[str, Any]:
    recorded = httpx.get(f"{mock_root}/_mock/requests", params={"limit": 1}).json()
    return recorded[-1]


@pytest.mark.asyncio
async def test_chat_goes_to_the_deployment_url_with_api_version_and_api_key(
    adapter: AzureOpenAIAdapter, mock_root: str
) -> None:
    reply = await adapter.chat(
        deployment_for(mock_root, "gpt-4o-prod+tokens=5"), chat_for({}), request_id="req-1"
    )

    sent = last_request(mock_root)
    assert sent["path"] == "/openai/deployments/gpt-4o-prod+tokens=5/chat/completions"
    assert sent["query"] == f"api-version={API_VERSION}"
    assert sent["headers"]["api-key"] == API_KEY
    assert "authorization" not in sent["headers"]
    assert sent["headers"]["x-request-id"] == "req-1"
    completion = ChatCompletion.model_validate_json(reply.body)
    # The mock serves the deployment named in the path, as Azure does.
    assert completion.model == "gpt-4o-prod"
    assert completion.choices[0].message.content == " ".join(
        completion_words("gpt-4o-prod", QUESTION, 5)
    )
    assert reply.usage == TokenUsage(input_tokens=PROMPT_TOKENS, output_tokens=5)


@pytest.mark.asyncio
async def test_stream_relays_openai_chunks_and_meters_them(
    adapter: AzureOpenAIAdapter, mock_root: str
) -> None:
    deployment = deployment_for(mock_root, "gpt-4o-prod+tokens=4")
    stream = await adapter.chat_stream(
        deployment, chat_for({}, stream=True, usage=True), request_id="req-1"
    )
    events: list[bytes] = []
    try:
        async for batch in stream.events():
            events.extend(event for event in batch.split(b"\n\n") if event)
    finally:
        await stream.aclose()

    sent = last_request(mock_root)
    assert sent["path"] == "/openai/deployments/gpt-4o-prod+tokens=4/chat/completions"
    assert sent["json"]["stream_options"] == {"include_usage": True}
    assert events[-1] == b"data: [DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(e[6:]) for e in events[:-1]]
    joined = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert joined == " ".join(completion_words("gpt-4o-prod", QUESTION, 4))
    assert stream.usage == TokenUsage(input_tokens=PROMPT_TOKENS, output_tokens=4)


@pytest.mark.asyncio
async def test_embeddings_go_to_the_deployment_url(
    adapter: AzureOpenAIAdapter, mock_root: str
) -> None:
    reply = await adapter.embeddings(
        deployment_for(mock_root, "embed-prod"),
        EmbeddingsRequest(
            model="e", payload={"model": "e", "input": "hello", "encoding_format": "base64"}
        ),
        request_id="req-1",
    )

    sent = last_request(mock_root)
    assert sent["path"] == "/openai/deployments/embed-prod/embeddings"
    assert sent["query"] == f"api-version={API_VERSION}"
    assert sent["headers"]["api-key"] == API_KEY
    raw = base64.b64decode(orjson.loads(reply.body)["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == embedding_vector("hello", 8)
    assert reply.usage == TokenUsage(input_tokens=1)


@pytest.mark.asyncio
async def test_missing_api_version_is_azures_400_as_upstream_rejected(
    adapter: AzureOpenAIAdapter, mock_root: str
) -> None:
    with pytest.raises(UpstreamRejected) as raised:
        await adapter.chat(
            deployment_for(mock_root, api_version=""), chat_for({}), request_id="req-1"
        )

    assert last_request(mock_root)["query"] == ""
    assert raised.value.status == 400 and not raised.value.retryable
    assert "api-version" in raised.value.message
    assert API_KEY not in raised.value.message and mock_root not in raised.value.message


@pytest.mark.asyncio
async def test_faults_map_like_openais(adapter: AzureOpenAIAdapter, mock_root: str) -> None:
    with pytest.raises(UpstreamRateLimited) as limited:
        await adapter.chat(
            deployment_for(mock_root, "d+fault=429+retry_after=3"), chat_for({}), request_id="r"
        )
    with pytest.raises(UpstreamError) as failed:
        await adapter.chat_stream(
            deployment_for(mock_root, "d+fault=500"), chat_for({}, stream=True), request_id="r"
        )

    assert limited.value.headers == {"retry-after": "3"}
    assert type(failed.value) is UpstreamError and failed.value.status == 502


def test_azure_reuses_the_openai_adapter() -> None:
    assert issubclass(AzureOpenAIAdapter, OpenAIAdapter)
    assert AzureOpenAIAdapter.kind == "azure"
    # Azure OpenAI takes OpenAI's parameters, so every field passes through.
    assert AzureOpenAIAdapter.chat_params is None
