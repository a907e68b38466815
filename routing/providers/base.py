"""The adapter interface every provider implements.

Shaped like Django's mail backends: an abstract base whose methods say what
they guarantee, one small module per provider, and an explicit registry in
`routing.providers`. Adapters translate, call the shared upstream session and
map usage and errors; they never touch the ORM or settings.
"""

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import ClassVar

import aiohttp

from billing.contracts import TokenUsage
from routing.contracts import ChatRequest, DeploymentSpec, EmbeddingsRequest


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    """A complete answer, already in the client's (OpenAI) format."""

    body: bytes
    usage: TokenUsage
    content_type: str = "application/json"


class UpstreamStream(abc.ABC):
    """An open upstream stream whose status was already checked."""

    @abc.abstractmethod
    def events(self) -> AsyncIterator[bytes]:
        """Yield client-ready SSE bytes as they arrive; raise UpstreamError mid-stream."""

    @property
    @abc.abstractmethod
    def usage(self) -> TokenUsage:
        """Usage so far: the provider's figures once sent, else an estimate."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the upstream connection; safe to call more than once."""


class ProviderAdapter(abc.ABC):
    kind: ClassVar[str]
    # OpenAI chat-completions fields this provider honours; None passes every
    # field through (OpenAI itself, so newer parameters keep working).
    chat_params: ClassVar[frozenset[str] | None] = None

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    @abc.abstractmethod
    async def chat(
        self, deployment: DeploymentSpec, chat: ChatRequest, *, request_id: str
    ) -> UpstreamReply:
        """A non-streamed chat completion; raises UpstreamError on any failure."""

    @abc.abstractmethod
    async def chat_stream(
        self, deployment: DeploymentSpec, chat: ChatRequest, *, request_id: str
    ) -> UpstreamStream:
        """Open a streamed chat completion: returns once the provider accepted it.

        Raises UpstreamError if the provider fails before the first event, so
        the caller can still answer with a proper status.
        """

    @abc.abstractmethod
    async def embeddings(
        self, deployment: DeploymentSpec, request: EmbeddingsRequest, *, request_id: str
    ) -> UpstreamReply:
        """Embeddings for the request's input; raises UpstreamError on any failure."""
