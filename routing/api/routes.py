"""Routes (a public model name and the deployments that serve it): list, add, read, change.

Only the org's own routes are listed here, not the global ones. Every deployment a
route names (deployments, variant, shadow) must be of this org's providers: one org's
credentials never serve another's traffic. There is no delete: use `enabled: false`.
"""

from typing import Any

from django.db import transaction
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from routing.models import Deployment, Route
from routing.services import route_create, route_update
from tenants.api.base import IF_MATCH, ManagementAPIView
from tenants.api.fields import MAX_ID, MAX_INT

MAX_DEPLOYMENTS = 100
MAX_FALLBACKS = 20


class RouteSerializer(serializers.ModelSerializer[Route]):
    deployments = serializers.PrimaryKeyRelatedField(many=True, read_only=True)
    fallback_models = serializers.ListField(child=serializers.CharField(), read_only=True)

    class Meta:
        model = Route
        fields = [
            "id", "model_name", "strategy", "deployments", "fallback_models", "max_attempts",
            "deadline_ms", "max_output_tokens", "variant_deployment", "variant_percent",
            "variant_sticky_by", "shadow_deployment", "shadow_percent", "cache_ttl_seconds",
            "cache_hit_billing", "unsupported_params", "enabled", "created_at", "updated_at",
        ]  # fmt: skip
        read_only_fields = fields


def own_deployment_field(**kwargs: Any) -> serializers.PrimaryKeyRelatedField:
    return serializers.PrimaryKeyRelatedField(
        queryset=Deployment.objects.none(), required=False, allow_null=True, **kwargs
    )


class RouteChangeFields(serializers.Serializer[Any]):
    """The editable fields, all optional: PATCH changes only what it is sent."""

    model_name = serializers.CharField(max_length=200, required=False)
    strategy = serializers.ChoiceField(choices=Route.Strategy.choices, required=False)
    deployments = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=MAX_ID),
        allow_empty=False,
        max_length=MAX_DEPLOYMENTS,
        required=False,
        help_text="Ids of this organization's deployments that serve the model name.",
    )
    fallback_models = serializers.ListField(
        child=serializers.CharField(max_length=200),
        max_length=MAX_FALLBACKS,
        required=False,
        help_text="Other model names to try, in order, when every deployment fails.",
    )
    max_attempts = serializers.IntegerField(
        required=False, min_value=1, max_value=32767,
        help_text="Upstream calls per request, retries and fallbacks included.",
    )  # fmt: skip
    deadline_ms = serializers.IntegerField(
        required=False, min_value=1, max_value=MAX_INT,
        help_text="No new attempt (retry or fallback) starts after this.",
    )  # fmt: skip
    max_output_tokens = serializers.IntegerField(
        required=False, allow_null=True, min_value=1, max_value=MAX_INT,
        help_text="Output tokens allowed when a request under a hard budget sets none.",
    )  # fmt: skip
    variant_deployment = own_deployment_field(help_text="A/B variant: one of the org's.")
    variant_percent = serializers.IntegerField(required=False, min_value=0, max_value=100)
    variant_sticky_by = serializers.ChoiceField(choices=Route.StickyBy.choices, required=False)
    shadow_deployment = own_deployment_field(help_text="Shadow traffic: one of the org's.")
    shadow_percent = serializers.IntegerField(required=False, min_value=0, max_value=100)
    cache_ttl_seconds = serializers.IntegerField(
        required=False, min_value=0, max_value=MAX_INT, help_text="0 keeps the cache off."
    )
    cache_hit_billing = serializers.ChoiceField(choices=Route.CacheBilling.choices, required=False)
    unsupported_params = serializers.ChoiceField(
        choices=Route.UnsupportedParams.choices, required=False
    )
    enabled = serializers.BooleanField(required=False)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Another org's deployment id reads exactly like a missing one.
        for name in ("variant_deployment", "shadow_deployment"):
            self.fields[name].queryset = self._own_deployments()  # type: ignore[attr-defined]

    def _own_deployments(self) -> Any:
        org = self.context.get("org")
        return Deployment.objects.filter(provider__org=org).select_related("provider")

    def validate_deployments(self, ids: list[int]) -> list[Deployment]:
        wanted = list(dict.fromkeys(ids))
        found = self._own_deployments().in_bulk(wanted)
        unknown = [str(pk) for pk in wanted if pk not in found]
        if unknown:
            raise serializers.ValidationError(
                f"Not deployments of this organization: {', '.join(unknown)}."
            )
        return [found[pk] for pk in wanted]


class RouteUpdateSerializer(RouteChangeFields):
    """PATCH: only the fields sent change; `deployments`, when sent, replaces the set."""


class RouteCreateSerializer(RouteChangeFields):
    model_name = serializers.CharField(
        max_length=200, help_text="The model name clients send in their requests."
    )
    deployments = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=MAX_ID),
        allow_empty=False,
        max_length=MAX_DEPLOYMENTS,
        help_text="Ids of this organization's deployments that serve the model name.",
    )


class RouteListView(ManagementAPIView):
    """The organization's own routes (global routes are not listed)."""

    queryset = Route.objects.prefetch_related("deployments")
    serializer_class = RouteSerializer
    filterset_fields = ["model_name", "strategy", "enabled"]
    ordering_fields = ["model_name", "created_at"]
    ordering = ["model_name"]

    @extend_schema(summary="List the organization's routes", responses=RouteSerializer(many=True))
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response(RouteSerializer(page, many=True).data)

    @extend_schema(
        summary="Publish a model name served by some of the organization's deployments",
        request=RouteCreateSerializer,
        responses={201: RouteSerializer},
    )
    def post(self, request: Request) -> Response:
        given = RouteCreateSerializer(data=request.data, context={"org": self.caller.org})
        given.is_valid(raise_exception=True)
        values = dict(given.validated_data)
        deployments = values.pop("deployments")
        route = route_create(
            org=self.caller.org, actor=self.caller.actor, values=values, deployments=deployments
        )
        response = Response(RouteSerializer(route).data, status=status.HTTP_201_CREATED)
        return self.with_etag(response, route)


class RouteDetailView(ManagementAPIView):
    """One route. To stop serving it, PATCH `enabled: false` (there is no delete)."""

    queryset = Route.objects.prefetch_related("deployments")
    serializer_class = RouteSerializer

    @extend_schema(summary="Read a route")
    def get(self, request: Request, pk: int) -> Response:
        route = self.get_object()
        return self.with_etag(Response(RouteSerializer(route).data), route)

    @extend_schema(
        summary="Change a route; `deployments`, when sent, replaces the set it uses",
        parameters=[IF_MATCH],
        request=RouteUpdateSerializer,
        responses=RouteSerializer,
    )
    def patch(self, request: Request, pk: int) -> Response:
        given = RouteUpdateSerializer(data=request.data, context={"org": self.caller.org})
        given.is_valid(raise_exception=True)
        changes = dict(given.validated_data)
        deployments = changes.pop("deployments", None)
        with transaction.atomic():
            route = route_update(
                route=self.locked_object(),
                actor=self.caller.actor,
                changes=changes,
                deployments=deployments,
            )
        return self.with_etag(Response(RouteSerializer(route).data), route)
