"""Alert channels: list, add, read, change, delete, rotate a webhook's secret and send a test
(admins change; everyone reads).

A webhook's signing secret is stored encrypted (billing/models.py) and is in the response
to the call that made it (create or rotate) only: no other response carries it, its
ciphertext, or anything derived from it but an ETag hash and whether one is set.
"""

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from billing.alert_channels import (
    NOTIFY_FIELDS,
    alert_channel_create,
    alert_channel_delete,
    alert_channel_enable,
    alert_channel_secret_rotate,
    alert_channel_test_send,
    alert_channel_update,
)
from billing.models import AlertChannel, recipients_parse, validate_webhook_url
from tenants.api.base import IF_MATCH, Conflict, ManagementAPIView
from tenants.api.keys import ShownOnceSchema

URL_MAX_LENGTH = 2000  # AlertChannel.url
MAX_RECIPIENTS = 50
SECRET_HELP = (
    "The webhook signing secret (verify X-Tollgate-Signature with it), shown in this "
    "response only: store it now, it cannot be read again (rotate it if it is lost). "
    "Null for an e-mail channel."
)


# ------------------------------------------------------------------ validation


def webhook_url_shape_check(value: str) -> str:
    """The model's URL rule (http(s), a host, no credentials or fragment), as a field error."""
    if not value:
        return value
    try:
        validate_webhook_url(value)
    except DjangoValidationError as refused:
        raise serializers.ValidationError(refused.messages) from None
    return value


class RecipientsField(serializers.ListField):
    """E-mail addresses in, a list out; stored as the model's comma-separated text."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(
            child=serializers.EmailField(max_length=254),
            max_length=MAX_RECIPIENTS,
            help_text="E-mail channels: the addresses alerts are sent to. Empty for webhooks.",
            **kwargs,
        )

    def to_representation(self, data: Any) -> list[str]:
        return recipients_parse(data) if isinstance(data, str) else list(data)

    def to_internal_value(self, data: Any) -> list[str]:
        addresses = super().to_internal_value(data)
        # Stored comma-separated: a (quoted) comma inside an address would split it.
        if any("," in address or "\n" in address for address in addresses):
            raise serializers.ValidationError("An address may not contain a comma.")
        return list(dict.fromkeys(addresses))


def _destination_check(kind: str, url: str, recipients: list[str]) -> None:
    """A webhook has a URL and no recipients; an e-mail channel the reverse. (Whether a
    webhook's host is public is checked by the services, for the dashboard too.)"""
    if kind == AlertChannel.Kind.WEBHOOK:
        if recipients:
            raise serializers.ValidationError({"recipients": "A webhook has no recipients."})
        if not url:
            raise serializers.ValidationError({"url": "A webhook needs a URL."})
    else:
        if url:
            raise serializers.ValidationError({"url": "An e-mail channel has no URL."})
        if not recipients:
            raise serializers.ValidationError({"recipients": "Give at least one e-mail address."})


# ------------------------------------------------------------------ serializers


class AlertChannelSerializer(serializers.ModelSerializer[AlertChannel]):
    """A channel as everyone may see it (never its secret), and what creating one takes."""

    kind = serializers.ChoiceField(
        choices=AlertChannel.Kind.choices,
        help_text="webhook: a signed JSON POST; email: a message to the recipients. Fixed once "
        "created.",
    )
    url = serializers.CharField(
        max_length=URL_MAX_LENGTH,
        required=False,
        allow_blank=True,
        default="",
        validators=[webhook_url_shape_check],
        help_text="Webhooks: the http(s) URL alerts are POSTed to, on a public host. Empty "
        "for e-mail channels.",
    )
    recipients = RecipientsField(required=False, default=list)
    notify_threshold = serializers.BooleanField(
        default=True, help_text="Alert when a budget crosses one of its thresholds."
    )
    notify_exhausted = serializers.BooleanField(
        default=True, help_text="Alert when a budget is exhausted."
    )
    notify_spike = serializers.BooleanField(default=True, help_text="Alert on a spend spike.")
    enabled = serializers.BooleanField(
        default=True, help_text="A disabled channel gets no new alerts."
    )
    has_signing_secret = serializers.BooleanField(
        source="has_secret",
        read_only=True,
        help_text="Whether a signing secret is set (webhooks). The secret itself is never shown.",
    )

    class Meta:
        model = AlertChannel
        fields = [
            "id", "name", "kind", "url", "recipients", *NOTIFY_FIELDS, "enabled",
            "has_signing_secret", "created_at",
        ]  # fmt: skip
        read_only_fields = ["id", "has_signing_secret", "created_at"]

    def validate(self, data: dict[str, Any]) -> dict[str, Any]:
        _destination_check(data["kind"], data["url"], data["recipients"])
        return data


class AlertChannelSecretSerializer(AlertChannelSerializer):
    """A channel with its signing secret: the create and rotate responses only."""

    signing_secret = serializers.CharField(read_only=True, allow_null=True, help_text=SECRET_HELP)

    class Meta(AlertChannelSerializer.Meta):
        fields = [*AlertChannelSerializer.Meta.fields, "signing_secret"]
        read_only_fields = fields


class AlertChannelSecretSchema(ShownOnceSchema):
    target_class = AlertChannelSecretSerializer
    shown_with = AlertChannelSerializer


class AlertChannelUpdateSerializer(serializers.Serializer[Any]):
    """PATCH: only the fields sent change; the kind never does. `context` holds `channel`."""

    name = serializers.CharField(max_length=200, required=False)
    url = serializers.CharField(
        max_length=URL_MAX_LENGTH,
        required=False,
        allow_blank=True,
        validators=[webhook_url_shape_check],
        help_text="Webhooks only: the new URL, on a public host.",
    )
    recipients = RecipientsField(required=False)
    notify_threshold = serializers.BooleanField(required=False)
    notify_exhausted = serializers.BooleanField(required=False)
    notify_spike = serializers.BooleanField(required=False)
    enabled = serializers.BooleanField(
        required=False, help_text="A disabled channel gets no new alerts."
    )

    def validate(self, data: dict[str, Any]) -> dict[str, Any]:
        channel: AlertChannel = self.context["channel"]
        sent = self.initial_data if isinstance(self.initial_data, dict) else {}
        # Not a field (the kind is fixed), but a client echoing what it read may send it.
        if sent.get("kind", channel.kind) != channel.kind:
            raise serializers.ValidationError(
                {"kind": "A channel's kind is fixed; delete it and add another."}
            )
        url = data.get("url", channel.url)
        recipients = data.get("recipients", recipients_parse(channel.recipients))
        if "url" in data or "recipients" in data:
            _destination_check(channel.kind, url, recipients)
        return data


class TestOutcomeSerializer(serializers.Serializer[Any]):
    delivered = serializers.BooleanField(help_text="Whether the receiver accepted the alert.")
    response_status = serializers.IntegerField(
        allow_null=True, help_text="The receiver's HTTP status; null for e-mail or no answer."
    )
    error = serializers.CharField(
        allow_blank=True,
        help_text="What went wrong, in a few words; empty when delivered.",
    )


# ------------------------------------------------------------------ views


class AlertChannelView(ManagementAPIView):
    """Where the organization's budget alerts go: signed webhooks or e-mail."""

    queryset = AlertChannel.objects.select_related("org")
    serializer_class = AlertChannelSerializer

    def with_secret(self, channel: AlertChannel, secret: str, *, status_code: int) -> Response:
        body = {**AlertChannelSerializer(channel).data, "signing_secret": secret or None}
        response = self.with_etag(Response(body, status=status_code), channel)
        response["Cache-Control"] = "no-store"  # the secret must not linger in caches
        return response


class AlertChannelListView(AlertChannelView):
    filterset_fields = ["kind", "enabled"]
    ordering_fields = ["id", "name", "created_at"]
    ordering = ["name", "id"]

    @extend_schema(summary="List alert channels", responses=AlertChannelSerializer(many=True))
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response(AlertChannelSerializer(page, many=True).data)

    @extend_schema(
        summary="Add an alert channel (a webhook's signing secret is in this response only)",
        request=AlertChannelSerializer,
        responses={201: AlertChannelSecretSerializer},
    )
    def post(self, request: Request) -> Response:
        given = AlertChannelSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        values = given.validated_data
        channel = AlertChannel(
            org=self.caller.org,
            **{name: value for name, value in values.items() if name != "recipients"},
            recipients=", ".join(values["recipients"]),
        )
        secret = alert_channel_create(channel=channel, actor=self.caller.actor)
        return self.with_secret(channel, secret, status_code=status.HTTP_201_CREATED)


class AlertChannelDetailView(AlertChannelView):
    @extend_schema(summary="Read an alert channel")
    def get(self, request: Request, pk: int) -> Response:
        channel = self.get_object()
        return self.with_etag(Response(AlertChannelSerializer(channel).data), channel)

    @extend_schema(
        summary="Change an alert channel's name, destination, events or enabled state",
        parameters=[IF_MATCH],
        request=AlertChannelUpdateSerializer,
        responses=AlertChannelSerializer,
    )
    def patch(self, request: Request, pk: int) -> Response:
        # Validated before the lock: a URL check may resolve a name (the kind never changes).
        given = AlertChannelUpdateSerializer(
            data=request.data, context={"channel": self.get_object()}
        )
        given.is_valid(raise_exception=True)
        changes = dict(given.validated_data)
        enabled = changes.pop("enabled", None)
        if "recipients" in changes:
            changes["recipients"] = ", ".join(changes["recipients"])
        with transaction.atomic():
            channel = self.locked_object()
            current = {
                "name": channel.name, "url": channel.url, "recipients": channel.recipients,
                **{name: getattr(channel, name) for name in NOTIFY_FIELDS},
            }  # fmt: skip
            channel = alert_channel_update(
                channel=channel, actor=self.caller.actor, **{**current, **changes}
            )
            if enabled is not None:
                channel = alert_channel_enable(
                    channel=channel, enabled=enabled, actor=self.caller.actor
                )
        return self.with_etag(Response(AlertChannelSerializer(channel).data), channel)

    @extend_schema(summary="Delete an alert channel", parameters=[IF_MATCH], responses={204: None})
    def delete(self, request: Request, pk: int) -> Response:
        with transaction.atomic():
            alert_channel_delete(channel=self.locked_object(), actor=self.caller.actor)
        return Response(status=status.HTTP_204_NO_CONTENT)


class AlertChannelRotateSecretView(AlertChannelView):
    @extend_schema(
        summary="Give a webhook a new signing secret (the old one stops verifying; the new "
        "one is in this response only)",
        parameters=[IF_MATCH],
        request=None,
        responses=AlertChannelSecretSerializer,
    )
    def post(self, request: Request, pk: int) -> Response:
        with transaction.atomic():
            channel = self.locked_object()
            if channel.kind != AlertChannel.Kind.WEBHOOK:
                raise Conflict("Only a webhook has a signing secret; this is an e-mail channel.")
            secret = alert_channel_secret_rotate(channel=channel, actor=self.caller.actor)
        return self.with_secret(channel, secret, status_code=status.HTTP_200_OK)


class AlertChannelTestView(AlertChannelView):
    @extend_schema(
        summary="Send a test alert through the channel now (not retried) and say how it went",
        request=None,
        responses=TestOutcomeSerializer,
    )
    def post(self, request: Request, pk: int) -> Response:
        outcome = alert_channel_test_send(channel=self.get_object(), actor=self.caller.actor)
        return Response(TestOutcomeSerializer(outcome).data)
