"""The base of every management API view: who is calling, for which org, with what role.

Two ways in:
- an API token (`Authorization: Bearer tgm_...`), created in the dashboard, scoped to
  one organization with one role (admin, finance or read-only);
- the dashboard's session (CSRF-checked), for the org named by `?org=<slug>` (or the
  user's only org), with the user's role there: owners and admins act as admins,
  finance members as finance; plain members have no management API.

Every view reads and writes inside `self.caller.org` only: an object of another org is
a 404, exactly like one that does not exist.
"""

import hashlib
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import models
from django.db.models import QuerySet
from django.shortcuts import get_object_or_404
from django_ratelimit.core import is_ratelimited
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter
from rest_framework import exceptions, status
from rest_framework.authentication import SessionAuthentication
from rest_framework.generics import GenericAPIView
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response

from tenants.api.authentication import APITokenAuthentication
from tenants.models import APIToken, Membership, Organization
from tenants.services import Actor

Role = APIToken.Role
ALL_ROLES = frozenset(Role)
ADMIN_ONLY = frozenset({Role.ADMIN})
ADMIN_AND_FINANCE = frozenset({Role.ADMIN, Role.FINANCE})
# A session user's membership role, as an API role (members have none).
SESSION_ROLES = {
    Membership.Role.OWNER: Role.ADMIN,
    Membership.Role.ADMIN: Role.ADMIN,
    Membership.Role.FINANCE: Role.FINANCE,
}
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the org they act in, their API role, and how audit entries name them."""

    org: Organization
    role: str
    actor: Actor


def _client_ip(request: Request) -> str | None:
    return request.META.get("REMOTE_ADDR")


def _session_org(user: AbstractBaseUser, slug: str | None) -> tuple[Organization, str | None]:
    """The org a session call acts in, and the user's membership role there."""
    memberships = Membership.objects.filter(user=user).select_related("org")
    if slug:
        org = Organization.objects.filter(slug=slug).first()
        if org is None:
            raise exceptions.NotFound("No such organization.")
        if getattr(user, "is_superuser", False):
            return org, Membership.Role.OWNER
        role = memberships.filter(org=org).values_list("role", flat=True).first()
        if role is None:
            raise exceptions.NotFound("No such organization.")  # the same as a missing one
        return org, role
    found = list(memberships[:2])
    if len(found) != 1:
        raise exceptions.ValidationError(
            {"org": "Name the organization with ?org=<slug>: you belong to several (or none)."}
        )
    return found[0].org, found[0].role


def caller_of(request: Request) -> Caller:
    slug = request.query_params.get("org")
    if isinstance(request.auth, APIToken):
        token = request.auth
        if slug and slug != token.org.slug:
            raise exceptions.NotFound("No such organization.")
        # The token's role as a membership role: finance, or admin (never owner).
        role = token.role if token.role != Role.READ_ONLY else Membership.Role.MEMBER
        actor = Actor(label=f"api token {token.prefix}", ip_address=_client_ip(request), role=role)
        return Caller(org=token.org, role=token.role, actor=actor)
    org, membership_role = _session_org(request.user, slug)
    role = SESSION_ROLES.get(membership_role or "")
    if role is None:
        raise exceptions.PermissionDenied(
            "The management API is for the organization's owners, admins and finance members."
        )
    return Caller(
        org=org, role=role, actor=Actor(user=request.user, ip_address=_client_ip(request))
    )


class Conflict(exceptions.APIException):
    """The object's state forbids the change (a team that still has keys)."""

    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"


class PreconditionFailed(exceptions.APIException):
    status_code = status.HTTP_412_PRECONDITION_FAILED
    default_code = "precondition_failed"


def etag_of(instance: models.Model) -> str:
    """A strong ETag for one row: it changes whenever the row's saved state changes
    (its `updated_at` where it has one, else every concrete field's value)."""
    stamp = getattr(instance, "updated_at", None)
    if stamp is not None:
        state = stamp.isoformat()
    else:
        state = repr(
            [field.value_from_object(instance) for field in instance._meta.concrete_fields]
        )
    seed = f"{instance._meta.label_lower}:{instance.pk}:{state}"
    return '"' + hashlib.sha256(seed.encode()).hexdigest()[:32] + '"'


IF_MATCH = OpenApiParameter(
    "If-Match",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    description="The ETag from your last read. If the object changed since, the call is "
    "refused with 412 and nothing is written.",
)


class ManagementAPIView(GenericAPIView):
    # Signed-in callers only, rate limited per user or address (TOLLGATE_API_RATE_LIMIT,
    # shared across replicas through the cache). `read_roles` may GET; `write_roles` may
    # change things. Views reach objects only through `get_queryset()` (org-scoped).
    # (A comment, not a docstring: drf-spectacular would publish it for every view.)

    authentication_classes = [APITokenAuthentication, SessionAuthentication]
    permission_classes = [IsAuthenticated]
    read_roles: Collection[str] = ALL_ROLES
    write_roles: Collection[str] = ADMIN_ONLY
    caller: Caller

    def initial(self, request: Request, *args: object, **kwargs: object) -> None:
        # Counted before authentication, so failed attempts count too.
        if is_ratelimited(
            request._request,
            group="management-api",
            key="user_or_ip",
            rate=settings.TOLLGATE_API_RATE_LIMIT,
            increment=True,
        ):
            raise exceptions.Throttled(
                wait=60, detail="Too many API calls. Wait a minute, then retry."
            )
        super().initial(request, *args, **kwargs)
        self.caller = caller_of(request)
        allowed = self.read_roles if request.method in SAFE_METHODS else self.write_roles
        if self.caller.role not in allowed:
            raise exceptions.PermissionDenied(
                f"A {Role(self.caller.role).name.lower().replace('_', '-')} caller may not do this."
            )

    def org_queryset(self, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset.filter(org=self.caller.org)

    def get_queryset(self) -> QuerySet[Any]:
        return self.org_queryset(super().get_queryset())

    def locked_object(self) -> Any:
        """The URL's object, row-locked until the transaction ends, after the If-Match
        check: call inside `transaction.atomic()` before changing it."""
        queryset = self.get_queryset().select_for_update(of=("self",))
        instance = get_object_or_404(
            queryset, **{self.lookup_field: self.kwargs[self.lookup_field]}
        )
        if_match_check(self.request, instance)
        return instance

    def with_etag(self, response: Response, instance: models.Model) -> Response:
        response["ETag"] = etag_of(instance)
        return response


def if_match_check(request: Request, instance: models.Model) -> None:
    header = request.headers.get("If-Match", "").strip()
    if not header or header == "*":
        return
    current = etag_of(instance)
    offered = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    if current not in offered:
        raise PreconditionFailed(
            f"This {instance._meta.verbose_name} changed since you read it. Read it again "
            "(GET), check the change, then retry with its new ETag in If-Match."
        )
