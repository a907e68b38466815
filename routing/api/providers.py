"""Providers: list, add, read and change (admins change; everyone reads).

A provider's API key is write-only: it is stored encrypted (routing/models.py) and
no response, to any role, carries it or its ciphertext, only whether one is set.
There is no delete (the services keep none): disable a provider with `enabled: false`.
"""

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from routing.models import Provider, validate_base_url
from routing.services import provider_create, provider_update
from tenants.api.base import IF_MATCH, ManagementAPIView

API_KEY_MAX_LENGTH = 4096


def base_url_check(value: str) -> str:
    """The model's URL rule, as a serializer error naming the field."""
    if not value:
        return value
    try:
        validate_base_url(value)
    except DjangoValidationError as refused:
        raise serializers.ValidationError(refused.messages) from None
    return value


class ProviderSerializer(serializers.ModelSerializer[Provider]):
    has_api_key = serializers.BooleanField(
        read_only=True, help_text="Whether an API key is stored. The key itself is never shown."
    )

    class Meta:
        model = Provider
        fields = [
            "id", "name", "kind", "base_url", "api_version", "enabled", "has_api_key",
            "created_at", "updated_at",
        ]  # fmt: skip
        read_only_fields = fields


class ProviderCreateSerializer(serializers.Serializer[Any]):
    name = serializers.CharField(max_length=200)
    kind = serializers.ChoiceField(choices=Provider.Kind.choices)
    base_url = serializers.CharField(
        max_length=500,
        required=False,
        allow_blank=True,
        default="",
        validators=[base_url_check],
        help_text="Blank: the usual address of this kind of provider.",
    )
    api_version = serializers.CharField(
        max_length=32, required=False, allow_blank=True, default="", help_text="Azure OpenAI only."
    )
    enabled = serializers.BooleanField(required=False, default=True)
    api_key = serializers.CharField(
        max_length=API_KEY_MAX_LENGTH,
        required=False,
        allow_blank=True,
        default="",
        write_only=True,
        help_text="Write-only: stored encrypted and never shown again.",
    )


class ProviderUpdateSerializer(serializers.Serializer[Any]):
    """PATCH: only the fields sent change; an absent or empty `api_key` keeps the stored key."""

    name = serializers.CharField(max_length=200, required=False)
    kind = serializers.ChoiceField(choices=Provider.Kind.choices, required=False)
    base_url = serializers.CharField(
        max_length=500, required=False, allow_blank=True, validators=[base_url_check]
    )
    api_version = serializers.CharField(max_length=32, required=False, allow_blank=True)
    enabled = serializers.BooleanField(required=False)
    api_key = serializers.CharField(
        max_length=API_KEY_MAX_LENGTH,
        required=False,
        allow_blank=True,
        write_only=True,
        help_text="Write-only: replaces the stored key.",
    )
    remove_api_key = serializers.BooleanField(
        required=False, default=False, help_text="Drop the stored key."
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs.get("api_key") and attrs.get("remove_api_key"):
            raise serializers.ValidationError(
                {"remove_api_key": "Give a new api_key or remove the stored one, not both."}
            )
        return attrs


class ProviderListView(ManagementAPIView):
    """The organization's providers. API keys are write-only: never shown, to anyone."""

    queryset = Provider.objects.all()
    serializer_class = ProviderSerializer
    filterset_fields = ["kind", "enabled"]
    ordering_fields = ["name", "kind", "created_at"]
    ordering = ["name"]

    @extend_schema(summary="List providers", responses=ProviderSerializer(many=True))
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response(ProviderSerializer(page, many=True).data)

    @extend_schema(
        summary="Add a provider",
        request=ProviderCreateSerializer,
        responses={201: ProviderSerializer},
    )
    def post(self, request: Request) -> Response:
        given = ProviderCreateSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        values = dict(given.validated_data)
        api_key = values.pop("api_key")
        provider = provider_create(
            org=self.caller.org, actor=self.caller.actor, values=values, api_key=api_key
        )
        response = Response(ProviderSerializer(provider).data, status=status.HTTP_201_CREATED)
        return self.with_etag(response, provider)


class ProviderDetailView(ManagementAPIView):
    """One provider. To stop using it, PATCH `enabled: false` (there is no delete)."""

    queryset = Provider.objects.all()
    serializer_class = ProviderSerializer

    @extend_schema(summary="Read a provider")
    def get(self, request: Request, pk: int) -> Response:
        provider = self.get_object()
        return self.with_etag(Response(ProviderSerializer(provider).data), provider)

    @extend_schema(
        summary="Change a provider, its API key, or disable it",
        parameters=[IF_MATCH],
        request=ProviderUpdateSerializer,
        responses=ProviderSerializer,
    )
    def patch(self, request: Request, pk: int) -> Response:
        given = ProviderUpdateSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        changes = dict(given.validated_data)
        api_key = changes.pop("api_key", "")
        remove_api_key = changes.pop("remove_api_key")
        with transaction.atomic():
            provider = provider_update(
                provider=self.locked_object(),
                actor=self.caller.actor,
                changes=changes,
                api_key=api_key,
                remove_api_key=remove_api_key,
            )
        return self.with_etag(Response(ProviderSerializer(provider).data), provider)
