"""Teams: list, create, read, change and delete (admins change; everyone reads)."""

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from tenants.api.base import IF_MATCH, Conflict, ManagementAPIView
from tenants.api.fields import RATE_LIMIT
from tenants.models import Team
from tenants.services import team_create, team_delete, team_update


class TeamSerializer(serializers.ModelSerializer[Team]):
    class Meta:
        model = Team
        fields = ["id", "slug", "name", "rpm_limit", "tpm_limit", "created_at", "updated_at"]
        read_only_fields = fields


class TeamCreateSerializer(serializers.Serializer[Any]):
    slug = serializers.SlugField(max_length=64)
    name = serializers.CharField(max_length=200)
    rpm_limit = serializers.IntegerField(**RATE_LIMIT)
    tpm_limit = serializers.IntegerField(**RATE_LIMIT)


class TeamUpdateSerializer(serializers.Serializer[Any]):
    """PATCH: only the fields sent change."""

    name = serializers.CharField(max_length=200, required=False)
    rpm_limit = serializers.IntegerField(**RATE_LIMIT)
    tpm_limit = serializers.IntegerField(**RATE_LIMIT)


class TeamListView(ManagementAPIView):
    """The organization's teams: keys, budgets and reports are grouped by them."""

    queryset = Team.objects.all()
    serializer_class = TeamSerializer
    filterset_fields = ["slug"]
    ordering_fields = ["name", "slug", "created_at"]
    ordering = ["name"]

    @extend_schema(summary="List teams", responses=TeamSerializer(many=True))
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response(TeamSerializer(page, many=True).data)

    @extend_schema(
        summary="Create a team", request=TeamCreateSerializer, responses={201: TeamSerializer}
    )
    def post(self, request: Request) -> Response:
        given = TeamCreateSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        values = given.validated_data
        if Team.objects.filter(org=self.caller.org, slug=values["slug"]).exists():
            raise serializers.ValidationError({"slug": "A team with this slug already exists."})
        with transaction.atomic():
            team = team_create(
                org=self.caller.org,
                slug=values["slug"],
                name=values["name"],
                actor=self.caller.actor,
            )
            if values.get("rpm_limit") or values.get("tpm_limit"):
                team = team_update(
                    team=team, actor=self.caller.actor, name=team.name,
                    rpm_limit=values.get("rpm_limit"), tpm_limit=values.get("tpm_limit"),
                )  # fmt: skip
        response = Response(TeamSerializer(team).data, status=status.HTTP_201_CREATED)
        return self.with_etag(response, team)


class TeamDetailView(ManagementAPIView):
    """One team. Its slug is fixed; a team with keys cannot be deleted."""

    queryset = Team.objects.all()
    serializer_class = TeamSerializer

    @extend_schema(summary="Read a team")
    def get(self, request: Request, pk: int) -> Response:
        team = self.get_object()
        return self.with_etag(Response(TeamSerializer(team).data), team)

    @extend_schema(
        summary="Change a team's name or rate limits",
        parameters=[IF_MATCH],
        request=TeamUpdateSerializer,
        responses=TeamSerializer,
    )
    def patch(self, request: Request, pk: int) -> Response:
        given = TeamUpdateSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        with transaction.atomic():
            team = self.locked_object()
            changes = {
                "name": team.name, "rpm_limit": team.rpm_limit, "tpm_limit": team.tpm_limit,
                **given.validated_data,
            }  # fmt: skip
            team = team_update(team=team, actor=self.caller.actor, **changes)
        return self.with_etag(Response(TeamSerializer(team).data), team)

    @extend_schema(
        summary="Delete a team without keys", parameters=[IF_MATCH], responses={204: None}
    )
    def delete(self, request: Request, pk: int) -> Response:
        try:
            with transaction.atomic():
                team_delete(team=self.locked_object(), actor=self.caller.actor)
        except DjangoValidationError as refused:
            raise Conflict(" ".join(refused.messages)) from None
        return Response(status=status.HTTP_204_NO_CONTENT)
