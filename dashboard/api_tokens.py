"""API tokens for the management API: create (the secret is shown once), list, revoke.

Owners and admins only, under Settings. A token acts for its organization with its role
(admin, finance or read-only) until it expires or is revoked; only its hash is stored.
"""

from datetime import timedelta

from django import forms
from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.urls import path, reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from dashboard.access import ADMIN_ROLES, Viewer, org_page, render_page
from dashboard.forms import DashboardForm, actor_of
from tenants.api_tokens import api_token_create, api_token_revoke
from tenants.models import APIToken

admin_page = org_page(
    ADMIN_ROLES, refusal="API tokens are for the organization's owners and admins."
)
LIFETIMES = [("30", "30 days"), ("90", "90 days"), ("365", "1 year"), ("", "No expiry")]


class APITokenForm(DashboardForm):
    name = forms.CharField(
        label="Name",
        max_length=100,
        help_text="Where it is used, e.g. “terraform” or “finance export”.",
    )
    role = forms.ChoiceField(
        label="Role", choices=APIToken.Role.choices, initial=APIToken.Role.READ_ONLY
    )
    lifetime = forms.ChoiceField(
        label="Expires after", choices=LIFETIMES, initial="90", required=False
    )


def _page(
    request: HttpRequest, viewer: Viewer, form: APITokenForm, *, status: int = 200
) -> HttpResponse:
    tokens = (
        APIToken.objects.filter(org=viewer.org).select_related("created_by").order_by("-created_at")
    )
    return render_page(
        request,
        viewer,
        "dashboard/settings_api_tokens.html",
        {"form": form, "tokens": list(tokens), "now": timezone.now()},
        status=status,
    )


@admin_page
def api_tokens(request: HttpRequest, viewer: Viewer) -> HttpResponse:
    """The org's tokens, and a form to create one; the POST shows the new secret once."""
    if request.method != "POST":
        return _page(request, viewer, APITokenForm())
    form = APITokenForm(request.POST)
    if not form.is_valid():
        return _page(request, viewer, form, status=400)
    days = form.cleaned_data["lifetime"]
    issued = api_token_create(
        org=viewer.org,
        name=form.cleaned_data["name"],
        role=form.cleaned_data["role"],
        actor=actor_of(request),
        expires_at=timezone.now() + timedelta(days=int(days)) if days else None,
    )
    response = render_page(
        request,
        viewer,
        "dashboard/settings_api_token_created.html",
        {
            "token": issued.token,
            "secret": issued.plaintext,
            "api_root": request.build_absolute_uri("/api/v1/"),
            "docs_url": request.build_absolute_uri(reverse("api-docs")),
        },
    )
    response["Cache-Control"] = "no-store"
    return response


@require_POST
@admin_page
def api_token_revoke_view(request: HttpRequest, viewer: Viewer, pk: int) -> HttpResponse:
    token = get_object_or_404(APIToken, pk=pk, org=viewer.org)
    api_token_revoke(token=token, actor=actor_of(request))
    messages.success(request, f"API token “{token.name}” revoked: its next call is refused.")
    return redirect(viewer.url("dashboard:settings_api_tokens"))


urlpatterns = [
    path("settings/api-tokens/", api_tokens, name="settings_api_tokens"),
    path(
        "settings/api-tokens/<int:pk>/revoke/",
        api_token_revoke_view,
        name="settings_api_token_revoke",
    ),
]
