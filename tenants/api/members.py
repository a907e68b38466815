"""Members and invitations: list, change roles and teams, remove, invite, revoke.

The guards (only owners make or touch owners, nobody changes their own membership,
an org keeps an owner) live in tenants/members.py. An API token acts for no user but
with its role (`Actor.role`), so those guards treat an admin token as the admin it is.
"""

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction
from django.db.models import QuerySet
from django.urls import reverse
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from tenants.api.base import (
    IF_MATCH,
    SAFE_METHODS,
    Conflict,
    ManagementAPIView,
)
from tenants.api.keys import OrgTeamField, ShownOnceSchema
from tenants.members import (
    invitation_create,
    invitation_email_send,
    invitation_revoke,
    membership_change,
    membership_remove,
)
from tenants.models import Invitation, Membership, Team

Role = Membership.Role
TEAM_IS_FOR_MEMBERS = 'Only members belong to a team: give the role "member", or no team.'


class MemberSerializer(serializers.ModelSerializer[Membership]):
    username = serializers.CharField(source="user.username", read_only=True)
    email = serializers.CharField(source="user.email", read_only=True)

    class Meta:
        model = Membership
        fields = ["id", "user", "username", "email", "role", "team", "created_at"]
        read_only_fields = fields


class MemberUpdateSerializer(serializers.Serializer[Any]):
    """PATCH: only the fields sent change."""

    role = serializers.ChoiceField(choices=Role.choices, required=False)
    team = OrgTeamField(
        required=False, allow_null=True, help_text="A team id of your org (members only)."
    )


class InvitationSerializer(serializers.ModelSerializer[Invitation]):
    """An invitation without its link: the link's token is shown once, when it is made."""

    status = serializers.ChoiceField(choices=Invitation.Status.choices, read_only=True)
    email = serializers.CharField(read_only=True)
    invited_by = serializers.CharField(
        source="invited_by.get_username", read_only=True, allow_null=True, default=None
    )

    class Meta:
        model = Invitation
        fields = [
            "id", "email", "role", "team", "status", "invited_by", "expires_at", "created_at",
        ]  # fmt: skip
        read_only_fields = fields


class InvitationCreatedSerializer(InvitationSerializer):
    accept_url = serializers.CharField(
        read_only=True,
        help_text="The path of the accept link on this server, shown in this response only.",
    )
    emailed = serializers.BooleanField(
        read_only=True, help_text="Whether the link was e-mailed to the invitation's address."
    )

    class Meta(InvitationSerializer.Meta):
        fields = [*InvitationSerializer.Meta.fields, "accept_url", "emailed"]
        read_only_fields = fields


class InvitationCreatedSchema(ShownOnceSchema):
    target_class = InvitationCreatedSerializer
    shown_with = InvitationSerializer


class InvitationCreateSerializer(serializers.Serializer[Any]):
    email = serializers.EmailField(
        required=False, allow_blank=True, help_text="We e-mail the link there, if given."
    )
    role = serializers.ChoiceField(choices=Role.choices)
    team = OrgTeamField(
        required=False, allow_null=True, help_text="A team id of your org (members only)."
    )

    def validate(self, values: dict[str, Any]) -> dict[str, Any]:
        if values.get("team") is not None and values["role"] != Role.MEMBER:
            raise serializers.ValidationError({"team": TEAM_IS_FOR_MEMBERS})
        return values


def refusal_as_conflict(refused: DjangoValidationError) -> Exception:
    """A field's error stays a 400; a refusal of the whole change (the last owner) is a 409."""
    if hasattr(refused, "error_dict"):
        return refused
    return Conflict(" ".join(refused.messages))


class MemberView(ManagementAPIView):
    """Your organization's members: everyone reads them, admins change them."""

    queryset = Membership.objects.select_related("user", "team")
    serializer_class = MemberSerializer


class MemberListView(MemberView):
    filterset_fields = ["role", "team"]
    ordering_fields = ["created_at", "role", "user__username"]
    ordering = ["user__username"]

    @extend_schema(summary="List the organization's members", responses=MemberSerializer(many=True))
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response(MemberSerializer(page, many=True).data)


class MemberDetailView(MemberView):
    @extend_schema(summary="Read a membership")
    def get(self, request: Request, pk: int) -> Response:
        membership = self.get_object()
        return self.with_etag(Response(MemberSerializer(membership).data), membership)

    @extend_schema(
        summary="Change a member's role or team",
        description="Only owners (signed in) make, change or remove owners; an API token "
        "acts as an admin. Nobody changes their own membership, and the last owner stays "
        "(409).",
        parameters=[IF_MATCH],
        request=MemberUpdateSerializer,
        responses=MemberSerializer,
    )
    def patch(self, request: Request, pk: int) -> Response:
        given = MemberUpdateSerializer(data=request.data, context={"org": self.caller.org})
        given.is_valid(raise_exception=True)
        values = given.validated_data
        try:
            with transaction.atomic():
                membership = self.locked_object()
                role = values.get("role", membership.role)
                team: Team | None = values.get("team", membership.team)
                if "team" in values and team is not None and role != Role.MEMBER:
                    raise serializers.ValidationError({"team": TEAM_IS_FOR_MEMBERS})
                membership = membership_change(
                    membership=membership, role=role, team=team, actor=self.caller.actor
                )
        except DjangoValidationError as refused:
            raise refusal_as_conflict(refused) from None
        return self.with_etag(Response(MemberSerializer(membership).data), membership)

    @extend_schema(
        summary="Remove someone from the organization",
        description="The same guards as a change: owners only for owners, never yourself, "
        "never the last owner (409).",
        parameters=[IF_MATCH],
        responses={204: None},
    )
    def delete(self, request: Request, pk: int) -> Response:
        try:
            with transaction.atomic():
                membership = self.locked_object()
                membership_remove(membership=membership, actor=self.caller.actor)
        except DjangoValidationError as refused:
            raise refusal_as_conflict(refused) from None
        return Response(status=status.HTTP_204_NO_CONTENT)


class InvitationView(ManagementAPIView):
    """Invitations to your organization: everyone reads them, admins make and revoke them."""

    queryset = Invitation.objects.select_related("team", "invited_by")
    serializer_class = InvitationSerializer


class InvitationListView(InvitationView):
    ordering_fields = ["created_at", "expires_at"]
    ordering = ["-created_at", "-id"]

    def get_queryset(self) -> QuerySet[Invitation]:
        # Pending is judged now, per request (the class attribute is built at import).
        return super().get_queryset().pending()

    @extend_schema(summary="List pending invitations", responses=InvitationSerializer(many=True))
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response(InvitationSerializer(page, many=True).data)

    @extend_schema(
        summary="Invite someone (the accept link is in this response only)",
        description="The link works once, for 7 days. With an e-mail address, it is also "
        "sent there. Only owners (signed in) invite owners; an API token acts as an admin.",
        request=InvitationCreateSerializer,
        responses={201: InvitationCreatedSerializer},
    )
    def post(self, request: Request) -> Response:
        given = InvitationCreateSerializer(data=request.data, context={"org": self.caller.org})
        given.is_valid(raise_exception=True)
        values = given.validated_data
        issued = invitation_create(
            org=self.caller.org, role=values["role"], email=values.get("email", ""),
            team=values.get("team"), actor=self.caller.actor,
        )  # fmt: skip
        accept_url = reverse("dashboard:invite_accept", args=[issued.token])
        emailed = invitation_email_send(
            invitation=issued.invitation, link=request.build_absolute_uri(accept_url)
        )
        body = {
            **InvitationSerializer(issued.invitation).data,
            "accept_url": accept_url,
            "emailed": emailed,
        }
        response = Response(body, status=status.HTTP_201_CREATED)
        response["Cache-Control"] = "no-store"  # the link lets anyone in
        return self.with_etag(response, issued.invitation)


class InvitationDetailView(InvitationView):
    def get_queryset(self) -> QuerySet[Invitation]:
        # Reads see pending invitations only, like the list; revoking stays idempotent.
        invitations = super().get_queryset()
        return invitations.pending() if self.request.method in SAFE_METHODS else invitations

    @extend_schema(summary="Read a pending invitation")
    def get(self, request: Request, pk: int) -> Response:
        invitation = self.get_object()
        return self.with_etag(Response(InvitationSerializer(invitation).data), invitation)

    @extend_schema(
        summary="Revoke an invitation (its link stops working; revoking again changes nothing)",
        parameters=[IF_MATCH],
        responses={204: None},
    )
    def delete(self, request: Request, pk: int) -> Response:
        with transaction.atomic():
            invitation = self.locked_object()
            invitation_revoke(invitation=invitation, actor=self.caller.actor)
        return Response(status=status.HTTP_204_NO_CONTENT)
