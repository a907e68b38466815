"""Virtual keys: issue, list, read, change, rotate and revoke (admins change; everyone reads).

The plaintext of a key is in the response to the call that made it (issue or rotate)
and nowhere else: it is not stored, only its hash is, and the hash is never returned.
"""

import json
from typing import Any

import django_filters
from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone
from drf_spectacular.extensions import OpenApiSerializerExtension
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from tenants.api.base import IF_MATCH, Conflict, ManagementAPIView
from tenants.api.fields import RATE_LIMIT, IdFilter
from tenants.ip_allowlist import MAX_ALLOWED_IPS, ip_allowlist_normalise
from tenants.models import Team, VirtualKey
from tenants.services import (
    virtual_key_issue,
    virtual_key_revoke,
    virtual_key_rotate,
    virtual_key_update,
)

MAX_MODEL_NAME_LENGTH = 200
MAX_ALLOWED_MODELS = 200
MAX_METADATA_BYTES = 8 * 1024
STATUSES = ("active", "revoked", "expired")


def key_status(key: VirtualKey) -> str:
    if key.revoked_at is not None:
        return "revoked"
    return "active" if key.is_active else "expired"


class VirtualKeySerializer(serializers.ModelSerializer[VirtualKey]):
    """A key as everyone may see it: its prefix, never its secret or the secret's hash."""

    allowed_models = serializers.ListField(
        child=serializers.CharField(),
        read_only=True,
        help_text="Public model names the key may call; empty: every model of the org.",
    )
    allowed_ips = serializers.ListField(
        child=serializers.CharField(),
        read_only=True,
        help_text="Client networks (CIDRs) the key may be used from; empty: anywhere.",
    )
    metadata = serializers.DictField(read_only=True)
    status = serializers.SerializerMethodField()

    class Meta:
        model = VirtualKey
        fields = [
            "id", "name", "prefix", "team", "status", "allowed_models", "allowed_ips",
            "rpm_limit", "tpm_limit", "expires_at", "revoked_at", "last_used_at", "metadata",
            "created_at", "updated_at",
        ]  # fmt: skip
        read_only_fields = fields

    @extend_schema_field(serializers.ChoiceField(choices=STATUSES))
    def get_status(self, key: VirtualKey) -> str:
        return key_status(key)


class IssuedKeySerializer(VirtualKeySerializer):
    key = serializers.CharField(
        read_only=True,
        help_text="The whole key, shown in this response only: store it now, it cannot be "
        "read again (rotate the key if it is lost).",
    )

    class Meta(VirtualKeySerializer.Meta):
        fields = [*VirtualKeySerializer.Meta.fields, "key"]
        read_only_fields = fields


class ShownOnceSchema(OpenApiSerializerExtension):
    """Documents a response that is an object plus what is shown once (a key, a link) as
    allOf [the object's component, the extra fields], so the object is described once."""

    target_class = IssuedKeySerializer
    shown_with: type[serializers.Serializer[Any]] = VirtualKeySerializer

    def map_serializer(self, auto_schema: Any, direction: Any) -> dict[str, Any]:
        plain = auto_schema.resolve_serializer(self.shown_with, direction)
        whole = auto_schema._map_serializer(self.target_class, direction, bypass_extensions=True)
        extra = [name for name in whole["properties"] if name not in plain.schema["properties"]]
        once = {
            "type": "object",
            "properties": {name: whole["properties"][name] for name in extra},
            "required": [name for name in whole.get("required", []) if name in extra],
        }
        return {"allOf": [plain.ref, once]}


@extend_schema_field(OpenApiTypes.INT)
class OrgTeamField(serializers.PrimaryKeyRelatedField[Team]):
    """A team id of the caller's org; any other id is refused like one that does not exist."""

    def get_queryset(self) -> QuerySet[Team]:
        return Team.objects.filter(org=self.context["org"])


def _no_nul(value: Any) -> bool:
    """Whether no string inside `value` holds a NUL (PostgreSQL's JSON cannot store one)."""
    if isinstance(value, str):
        return "\x00" not in value
    if isinstance(value, dict):
        return all(_no_nul(name) and _no_nul(inner) for name, inner in value.items())
    if isinstance(value, list):
        return all(_no_nul(inner) for inner in value)
    return True


class ModelNameField(serializers.CharField):
    """A model name: text only (DRF would turn 7 into "7")."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class KeySettingsSerializer(serializers.Serializer[Any]):
    """What an admin may set on a key; shared by issue (POST) and change (PATCH)."""

    name = serializers.CharField(max_length=200)
    allowed_models = serializers.ListField(
        child=ModelNameField(max_length=MAX_MODEL_NAME_LENGTH),
        max_length=MAX_ALLOWED_MODELS,
        required=False,
        help_text="Public model names the key may call; empty: every model of the org.",
    )
    allowed_ips = serializers.ListField(
        child=serializers.CharField(max_length=64),
        max_length=MAX_ALLOWED_IPS,
        required=False,
        help_text="Client IP addresses or networks (CIDRs, IPv4 or IPv6, e.g. "
        "203.0.113.0/24) the key may be used from; empty: anywhere. Stored normalised.",
    )
    rpm_limit = serializers.IntegerField(**RATE_LIMIT)
    tpm_limit = serializers.IntegerField(**RATE_LIMIT)
    expires_at = serializers.DateTimeField(
        required=False, allow_null=True, help_text="In the future; null: never expires."
    )

    def validate_allowed_ips(self, value: list[str]) -> list[str]:
        try:
            return ip_allowlist_normalise(value)
        except ValueError as exc:
            raise serializers.ValidationError(str(exc)) from None

    def validate_expires_at(self, value: Any) -> Any:
        if value is not None and value <= timezone.now():
            raise serializers.ValidationError("Give a time in the future.")
        return value


class KeyCreateSerializer(KeySettingsSerializer):
    team = OrgTeamField(required=False, allow_null=True, help_text="A team id of your org.")
    metadata = serializers.DictField(
        required=False, help_text="Your own JSON object (at most 8 KiB), kept with the key."
    )

    def validate_metadata(self, value: dict[str, Any]) -> dict[str, Any]:
        if not _no_nul(value):
            raise serializers.ValidationError("Text in metadata may not contain NUL characters.")
        try:
            encoded = json.dumps(value, separators=(",", ":"), allow_nan=False)
        except ValueError:  # 1e999 parses as infinity, which JSON columns cannot hold
            raise serializers.ValidationError("Numbers in metadata must be finite.") from None
        if len(encoded.encode()) > MAX_METADATA_BYTES:
            raise serializers.ValidationError("Keep metadata under 8 KiB of JSON.")
        return value


class KeyUpdateSerializer(KeySettingsSerializer):
    """PATCH: only the fields sent change."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["name"].required = False


class VirtualKeyFilter(django_filters.FilterSet):
    team = IdFilter(field_name="team_id", help_text="A team id.")
    status = django_filters.ChoiceFilter(
        choices=[(value, value) for value in STATUSES], method="filter_status"
    )
    search = django_filters.CharFilter(
        method="filter_search", help_text="Part of the key's name or prefix."
    )

    class Meta:
        model = VirtualKey
        fields = ["team", "status", "search"]

    def filter_status(
        self, queryset: QuerySet[VirtualKey], name: str, value: str
    ) -> QuerySet[VirtualKey]:
        if value == "revoked":
            return queryset.filter(revoked_at__isnull=False)
        unrevoked = queryset.filter(revoked_at__isnull=True)
        lapsed = Q(expires_at__lte=timezone.now())
        return unrevoked.filter(lapsed) if value == "expired" else unrevoked.exclude(lapsed)

    def filter_search(
        self, queryset: QuerySet[VirtualKey], name: str, value: str
    ) -> QuerySet[VirtualKey]:
        return queryset.filter(Q(name__icontains=value) | Q(prefix__icontains=value))


class KeyView(ManagementAPIView):
    """Virtual keys of your organization: everyone reads them, admins change them."""

    queryset = VirtualKey.objects.all()
    serializer_class = VirtualKeySerializer

    def issued(self, key: VirtualKey, plaintext: str, *, status_code: int) -> Response:
        body = {**VirtualKeySerializer(key).data, "key": plaintext}
        response = self.with_etag(Response(body, status=status_code), key)
        response["Cache-Control"] = "no-store"  # the plaintext must not linger in caches
        return response

    def unrevoked_locked_object(self) -> VirtualKey:
        key: VirtualKey = self.locked_object()
        if key.revoked_at is not None:
            raise Conflict("This key is revoked; issue a new key instead.")
        return key


class KeyListView(KeyView):
    filterset_class = VirtualKeyFilter
    ordering_fields = ["name", "created_at", "last_used_at"]
    ordering = ["-created_at", "-id"]

    @extend_schema(summary="List virtual keys", responses=VirtualKeySerializer(many=True))
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response(VirtualKeySerializer(page, many=True).data)

    @extend_schema(
        summary="Issue a virtual key (its plaintext is in this response only)",
        request=KeyCreateSerializer,
        responses={201: IssuedKeySerializer},
    )
    def post(self, request: Request) -> Response:
        given = KeyCreateSerializer(data=request.data, context={"org": self.caller.org})
        given.is_valid(raise_exception=True)
        issued = virtual_key_issue(
            org=self.caller.org, actor=self.caller.actor, owner=self.caller.actor.user,
            **given.validated_data,
        )  # fmt: skip
        return self.issued(issued.key, issued.plaintext, status_code=status.HTTP_201_CREATED)


class KeyDetailView(KeyView):
    @extend_schema(summary="Read a virtual key")
    def get(self, request: Request, pk: int) -> Response:
        key = self.get_object()
        return self.with_etag(Response(VirtualKeySerializer(key).data), key)

    @extend_schema(
        summary="Change a key's name, allowed models, IP allowlist, rate limits or expiry",
        parameters=[IF_MATCH],
        request=KeyUpdateSerializer,
        responses=VirtualKeySerializer,
    )
    def patch(self, request: Request, pk: int) -> Response:
        given = KeyUpdateSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        with transaction.atomic():
            key = self.unrevoked_locked_object()
            changes = {
                "name": key.name, "allowed_models": key.allowed_models,
                "allowed_ips": key.allowed_ips, "rpm_limit": key.rpm_limit,
                "tpm_limit": key.tpm_limit, "expires_at": key.expires_at, **given.validated_data,
            }  # fmt: skip
            key = virtual_key_update(key=key, actor=self.caller.actor, **changes)
        return self.with_etag(Response(VirtualKeySerializer(key).data), key)

    @extend_schema(
        summary="Revoke a key (the same as POST .../revoke/)",
        parameters=[IF_MATCH],
        responses={204: None},
    )
    def delete(self, request: Request, pk: int) -> Response:
        with transaction.atomic():
            virtual_key_revoke(key=self.locked_object(), actor=self.caller.actor)
        return Response(status=status.HTTP_204_NO_CONTENT)


class KeyRotateView(KeyView):
    @extend_schema(
        summary="Give a key a new secret (the old one stops working; the new one is in "
        "this response only)",
        parameters=[IF_MATCH],
        request=None,
        responses=IssuedKeySerializer,
    )
    def post(self, request: Request, pk: int) -> Response:
        with transaction.atomic():
            issued = virtual_key_rotate(key=self.unrevoked_locked_object(), actor=self.caller.actor)
        return self.issued(issued.key, issued.plaintext, status_code=status.HTTP_200_OK)


class KeyRevokeView(KeyView):
    @extend_schema(
        summary="Revoke a key for good (revoking it again changes nothing)",
        parameters=[IF_MATCH],
        request=None,
        responses=VirtualKeySerializer,
    )
    def post(self, request: Request, pk: int) -> Response:
        with transaction.atomic():
            key = virtual_key_revoke(key=self.locked_object(), actor=self.caller.actor)
        return self.with_etag(Response(VirtualKeySerializer(key).data), key)
