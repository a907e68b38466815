"""The built-in mock provider's Gemini (/v1beta) and Azure (/openai/deployments) endpoints."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from routing.mockprovider.content import completion_words, embedding_vector, plan_tool_call
from tests.support.processes import mock_provider

QUESTION = "Tell me about the mountains"
CONTENTS = [{"role": "user", "parts": [{"text": QUESTION}]}]
# Words in the question plus 3 tokens of framing per turn, as the OpenAI family counts.
PROMPT_TOKENS = 5 + 3
TOOLS = [{"functionDeclarations": [{"name": "get_weather"}, {"name": "get_time"}]}]
API_VERSION = "2024-10-21"


@pytest.fixture(scope="module")
def root_url() -> Iterator[str]:
    with mock_provider() as url:
        yield url.removesuffix("/v1")


def generate(
    root_url: str, model: str, body: dict[str, Any], *, method: str = "generateContent", **kw: Any
) -> httpx.Response:
    return httpx.post(f"{root_url}/v1beta/models/{model}:{method}", json=body, **kw)


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    """The JSON objects of a Gemini SSE body (events framed by CRLF CRLF)."""
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = [frame for frame in response.content.split(b"\r\n\r\n") if frame]
    assert all(frame.startswith(b"data: ") for frame in frames)
    return [orjson.loads(frame[6:]) for frame in frames]


def text_of(response: dict[str, Any], candidate: int = 0) -> str:
    parts = response["candidates"][candidate]["content"]["parts"]
    return "".join(part.get("text", "") for part in parts)


def test_generate_content_answers_with_the_openai_familys_words(root_url: str) -> None:
    response = generate(root_url, "mock-small+tokens=6", {"contents": CONTENTS})

    assert response.status_code == 200
    data = response.json()
    [candidate] = data["candidates"]
    assert text_of(data) == " ".join(completion_words("mock-small", QUESTION, 6))
    assert candidate["content"]["role"] == "model"
    assert candidate["finishReason"] == "STOP" and candidate["index"] == 0
    assert data["usageMetadata"] == {
        "promptTokenCount": PROMPT_TOKENS,
        "candidatesTokenCount": 6,
        "totalTokenCount": PROMPT_TOKENS + 6,
    }
    assert data["modelVersion"] == "mock-small"
    openai_answer = httpx.post(
        f"{root_url}/v1/chat/completions",
        json={"model": "mock-small+tokens=6", "messages": [{"role": "user", "content": QUESTION}]},
    ).json()
    assert openai_answer["choices"][0]["message"]["content"] == text_of(data)


def test_generation_config_caps_output_and_multiplies_candidates(root_url: str) -> None:
    body = {
        "contents": CONTENTS,
        "systemInstruction": {"parts": [{"text": "Be brief"}]},
        "generationConfig": {"maxOutputTokens": 3, "candidateCount": 2},
    }
    data = generate(root_url, "mock-small", body).json()

    assert [c["index"] for c in data["candidates"]] == [0, 1]
    assert {c["finishReason"] for c in data["candidates"]} == {"MAX_TOKENS"}
    assert text_of(data, 1) == " ".join(completion_words("mock-small", QUESTION, 3))
    # The system instruction's words count, without framing.
    assert data["usageMetadata"]["promptTokenCount"] == PROMPT_TOKENS + 2
    assert data["usageMetadata"]["candidatesTokenCount"] == 6


def test_stream_with_alt_sse_sends_word_deltas_then_finish_and_usage(root_url: str) -> None:
    whole = generate(root_url, "mock-small+tokens=5", {"contents": CONTENTS}).json()
    response = httpx.post(
        f"{root_url}/v1beta/models/mock-small+tokens=5:streamGenerateContent",
        params={"alt": "sse"},
        json={"contents": CONTENTS},
    )

    events = sse_events(response)
    assert len(events) == 6
    assert "".join(text_of(event) for event in events) == text_of(whole)
    assert all("finishReason" not in e["candidates"][0] for e in events[:-1])
    assert all("usageMetadata" not in event for event in events[:-1])
    assert events[-1]["candidates"][0]["finishReason"] == "STOP"
    assert events[-1]["usageMetadata"] == whole["usageMetadata"]
    assert len({event["responseId"] for event in events}) == 1


def test_stream_without_alt_is_one_json_array(root_url: str) -> None:
    response = generate(
        root_url, "mock-small+tokens=2", {"contents": CONTENTS}, method="streamGenerateContent"
    )

    assert response.headers["content-type"].startswith("application/json")
    first, second = completion_words("mock-small", QUESTION, 2)
    assert [text_of(event) for event in response.json()] == [first, " " + second, ""]


def test_declared_functions_are_called_with_the_shared_rule(root_url: str) -> None:
    data = generate(root_url, "mock-small", {"contents": CONTENTS, "tools": TOOLS}).json()

    expected = plan_tool_call(
        tool_names=["get_weather", "get_time"],
        forced=None,
        answering_tool_result=False,
        prompt=QUESTION,
    )
    assert expected is not None
    [candidate] = data["candidates"]
    assert candidate["content"]["parts"] == [
        {"functionCall": {"name": "get_weather", "args": {"query": QUESTION}}}
    ]
    assert candidate["finishReason"] == "STOP"
    assert data["usageMetadata"]["candidatesTokenCount"] == expected.completion_tokens


def test_function_calling_config_forces_or_disables_calls(root_url: str) -> None:
    forced = {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_time"]}}
    disabled = {"functionCallingConfig": {"mode": "NONE"}}

    forced_data = generate(
        root_url, "mock-small", {"contents": CONTENTS, "tools": TOOLS, "toolConfig": forced}
    ).json()
    disabled_data = generate(
        root_url, "mock-small", {"contents": CONTENTS, "tools": TOOLS, "toolConfig": disabled}
    ).json()

    assert forced_data["candidates"][0]["content"]["parts"][0]["functionCall"]["name"] == (
        "get_time"
    )
    assert text_of(disabled_data) == " ".join(completion_words("mock-small", QUESTION, 16))


def test_stream_carries_the_function_call_in_one_event(root_url: str) -> None:
    response = httpx.post(
        f"{root_url}/v1beta/models/mock-small:streamGenerateContent?alt=sse",
        json={"contents": CONTENTS, "tools": TOOLS},
    )

    events = sse_events(response)
    assert events[0]["candidates"][0]["content"]["parts"] == [
        {"functionCall": {"name": "get_weather", "args": {"query": QUESTION}}}
    ]
    assert events[-1]["candidates"][0]["finishReason"] == "STOP"


def test_a_function_response_turn_is_answered_with_text(root_url: str) -> None:
    contents = [
        *CONTENTS,
        {
            "role": "model",
            "parts": [{"functionCall": {"name": "get_weather", "args": {"query": QUESTION}}}],
        },
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"content": "sunny"}}}
            ],
        },
    ]
    data = generate(root_url, "mock-small+tokens=4", {"contents": contents, "tools": TOOLS}).json()

    # The last user *text* is still the question, as in the OpenAI family.
    assert text_of(data) == " ".join(completion_words("mock-small", QUESTION, 4))
    # Three turns of framing, the question and the response's one word.
    assert data["usageMetadata"]["promptTokenCount"] == 5 + 1 + 3 * 3


def test_fault_blocked_answers_with_prompt_feedback_and_no_candidates(root_url: str) -> None:
    whole = generate(root_url, "mock-small+fault=blocked", {"contents": CONTENTS})
    streamed = httpx.post(
        f"{root_url}/v1beta/models/mock-small:streamGenerateContent?alt=sse",
        json={"contents": CONTENTS},
        headers={"x-mock-fault": "blocked"},
    )
    on_openai = httpx.post(
        f"{root_url}/v1/chat/completions",
        json={"model": "mock-small+fault=blocked", "messages": [{"role": "user", "content": "x"}]},
    )

    assert whole.status_code == 200
    for data in (whole.json(), *sse_events(streamed)):
        assert data["promptFeedback"] == {"blockReason": "SAFETY"}
        assert "candidates" not in data
        assert data["usageMetadata"]["promptTokenCount"] == PROMPT_TOKENS
    assert on_openai.status_code == 400
    assert "Gemini" in on_openai.json()["error"]["message"]


@pytest.mark.parametrize(
    ("fault", "status_name"),
    [("429", "RESOURCE_EXHAUSTED"), ("500", "INTERNAL"), ("503", "UNAVAILABLE")],
)
def test_status_faults_use_geminis_error_shape(root_url: str, fault: str, status_name: str) -> None:
    response = generate(root_url, f"mock-small+fault={fault}", {"contents": CONTENTS})

    assert response.status_code == int(fault)
    assert response.json() == {
        "error": {
            "code": int(fault),
            "message": f"mock fault: injected HTTP {fault}",
            "status": status_name,
        }
    }
    if fault == "429":
        assert response.headers["retry-after"] == "1"


def test_bad_requests_and_unknown_paths_use_geminis_error_shape(root_url: str) -> None:
    no_contents = generate(root_url, "mock-small", {"contents": []})
    bad_option = generate(root_url, "mock-small+tokens=lots", {"contents": CONTENTS})
    unknown = httpx.post(f"{root_url}/v1beta/models/mock-small:countTokens", json={})

    assert no_contents.status_code == 400
    assert no_contents.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert "contents" in no_contents.json()["error"]["message"]
    assert bad_option.json()["error"]["code"] == 400
    assert unknown.status_code == 404
    assert unknown.json()["error"]["status"] == "NOT_FOUND"


def test_stream_reset_cuts_the_stream_after_some_events(root_url: str) -> None:
    received: list[bytes] = []
    with (
        pytest.raises(httpx.HTTPError),
        httpx.stream(
            "POST",
            f"{root_url}/v1beta/models/mock-small+tokens=40+fault=reset:streamGenerateContent",
            params={"alt": "sse"},
            json={"contents": CONTENTS},
        ) as response,
    ):
        received.extend(response.iter_bytes())

    assert b"".join(received).startswith(b"data: ")


def test_batch_embed_contents_matches_the_openai_vectors(root_url: str) -> None:
    body = {
        "requests": [
            {"model": "models/mock-embed", "content": {"parts": [{"text": "hello"}]}},
            {
                "model": "models/mock-embed",
                "content": {"parts": [{"text": "world"}]},
                "outputDimensionality": 3,
            },
        ]
    }
    data = generate(root_url, "mock-embed", body, method="batchEmbedContents").json()
    openai_vector = httpx.post(
        f"{root_url}/v1/embeddings", json={"model": "mock-embed", "input": "hello"}
    ).json()["data"][0]["embedding"]

    assert data == {
        "embeddings": [
            {"values": embedding_vector("hello", 8)},
            {"values": embedding_vector("world", 3)},
        ]
    }
    assert data["embeddings"][0]["values"] == openai_vector


def test_batch_embed_contents_checks_each_requests_model(root_url: str) -> None:
    body = {"requests": [{"model": "models/other", "content": {"parts": [{"text": "hi"}]}}]}
    response = generate(root_url, "mock-embed", body, method="batchEmbedContents")

    assert response.status_code == 400
    assert response.json()["error"]["status"] == "INVALID_ARGUMENT"


def test_gemini_key_header_satisfies_a_required_key() -> None:
    with mock_provider(require_key="sekret") as url:
        root = url.removesuffix("/v1")
        right = generate(root, "m", {"contents": CONTENTS}, headers={"x-goog-api-key": "sekret"})
        wrong = generate(root, "m", {"contents": CONTENTS}, headers={"x-goog-api-key": "nope"})

    assert right.status_code == 200
    # As Gemini answers a bad key: 400, not 401.
    assert wrong.status_code == 400
    assert wrong.json()["error"] == {
        "code": 400,
        "message": "API key not valid. Please pass a valid API key.",
        "status": "INVALID_ARGUMENT",
    }


def azure_client(root_url: str) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=root_url, api_key="azure-key", api_version=API_VERSION, max_retries=0
    )


def test_azure_chat_embeddings_and_stream_through_the_official_sdk(root_url: str) -> None:
    client = azure_client(root_url)
    messages: Any = [{"role": "user", "content": QUESTION}]
    assert httpx.delete(f"{root_url}/_mock/requests").status_code == 200

    completion = client.chat.completions.create(model="prod-gpt+tokens=5", messages=messages)
    stream = client.chat.completions.create(
        model="prod-gpt+tokens=5",
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
    )
    streamed = list(stream)
    embedding = client.embeddings.create(model="prod-embed", input="hello")

    words = " ".join(completion_words("prod-gpt", QUESTION, 5))
    assert completion.model == "prod-gpt"
    assert completion.choices[0].message.content == words
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == words
    assert streamed[-1].usage is not None and streamed[-1].usage.completion_tokens == 5
    assert embedding.data[0].embedding == pytest.approx(embedding_vector("hello", 8))
    recorded = httpx.get(f"{root_url}/_mock/requests").json()
    assert [r["path"] for r in recorded] == [
        "/openai/deployments/prod-gpt+tokens=5/chat/completions",
        "/openai/deployments/prod-gpt+tokens=5/chat/completions",
        "/openai/deployments/prod-embed/embeddings",
    ]
    assert {r["query"] for r in recorded} == {f"api-version={API_VERSION}"}
    assert {r["headers"]["api-key"] for r in recorded} == {"azure-key"}


def test_azure_without_api_version_is_a_400_in_azures_shape(root_url: str) -> None:
    response = httpx.post(
        f"{root_url}/openai/deployments/prod-gpt/chat/completions",
        json={"messages": [{"role": "user", "content": QUESTION}]},
    )

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "MissingApiVersionParameter"
    assert "api-version" in error["message"]


def test_azure_serves_the_deployment_named_in_the_path(root_url: str) -> None:
    response = httpx.post(
        f"{root_url}/openai/deployments/prod-gpt+tokens=2/chat/completions",
        params={"api-version": API_VERSION},
        json={"model": "ignored", "messages": [{"role": "user", "content": QUESTION}]},
    )

    assert response.status_code == 200
    assert response.json()["model"] == "prod-gpt"
    assert response.json()["choices"][0]["message"]["content"] == " ".join(
        completion_words("prod-gpt", QUESTION, 2)
    )


def test_azure_faults_use_the_openai_shape(root_url: str) -> None:
    client = azure_client(root_url)

    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="prod-gpt+fault=429", messages=[{"role": "user", "content": "x"}]
        )
