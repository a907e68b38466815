"""Organization settings: the org itself, its members and invitations, its alert channels.

Owners and admins only. Every change is a POST to a small view that calls one
service (tenants/members.py, billing/alert_channels.py) and redirects back with
a message; the guards (who may touch owners, the last owner) live in those
services, so a crafted request gets the same 403 as a hidden button. Secrets
(an invitation link, a webhook signing secret) are rendered once, in the
response to the POST that made them, and never again.
"""

import zoneinfo
from functools import cache
from typing import Any

from django import forms
from django.contrib import messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.urls import path, reverse
from django.views.decorators.http import require_POST

from billing.alert_channels import (
    NOTIFY_FIELDS,
    alert_channel_create,
    alert_channel_delete,
    alert_channel_enable,
    alert_channel_secret_rotate,
    alert_channel_test_send,
    alert_channel_update,
)
from billing.models import AlertChannel
from dashboard.access import ADMIN_ROLES, Role, Viewer, org_page, render_page
from dashboard.forms import TeamChoiceField, actor_of
from tenants.members import (
    invitation_create,
    invitation_email_send,
    invitation_revoke,
    membership_change,
    membership_remove,
    organization_settings_update,
)
from tenants.models import Invitation, Membership, Organization, Team

admin_page = org_page(ADMIN_ROLES, refusal="Settings are for the organization's owners and admins.")


@cache
def time_zone_choices() -> list[tuple[str, str]]:
    """Every IANA zone name, sorted, as select options."""
    return [(name, name) for name in sorted(zoneinfo.available_timezones())]


def roles_viewer_may_grant(viewer: Viewer) -> list[tuple[str, str]]:
    """Owners may give any role; admins any but owner."""
    return [
        (value, label)
        for value, label in Role.choices
        if viewer.role == Role.OWNER or value != Role.OWNER
    ]


# ---------------------------------------------------------------- forms


class OrganizationForm(forms.Form):
    name = forms.CharField(label="Name", max_length=200)
    time_zone = forms.ChoiceField(
        label="Time zone",
        choices=time_zone_choices,
        help_text="Budget periods, reports and statements use the days of this zone.",
    )
    log_request_bodies = forms.BooleanField(
        label="Keep request and response bodies",
        required=False,
        help_text=(
            "When on, the request log stores each request's prompt and the model's answer, "
            "so they can be inspected later. When off, only metadata is kept (model, "
            "tokens, cost, latency, status). Turn on only if your data policy allows it."
        ),
    )


class _TeamRoleForm(forms.Form):
    role = forms.ChoiceField(label="Role")
    team = TeamChoiceField(
        label="Team",
        queryset=Team.objects.none(),
        required=False,
        empty_label="No team",
        help_text="For members: they see only their team's keys and usage.",
    )

    def __init__(self, *args: Any, viewer: Viewer, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["role"].choices = roles_viewer_may_grant(viewer)
        self.fields["team"].queryset = Team.objects.filter(org=viewer.org).order_by("name")


class InviteForm(_TeamRoleForm):
    email = forms.EmailField(
        label="E-mail",
        required=False,
        help_text="We e-mail the link there. Leave empty to share the link yourself.",
    )
    field_order = ["email", "role", "team"]


class MemberForm(_TeamRoleForm):
    pass


class ChannelForm(forms.ModelForm):
    class Meta:
        model = AlertChannel
        fields = ["name", "kind", "url", "recipients", *NOTIFY_FIELDS]
        labels = {
            "url": "Webhook URL",
            "recipients": "E-mail recipients",
            "notify_threshold": "Budget threshold reached",
            "notify_exhausted": "Budget exhausted",
            "notify_spike": "Spend spike",
        }
        help_texts = {
            "url": "For webhooks: we POST signed JSON there (https:// recommended).",
            "recipients": "For e-mail: addresses separated by commas.",
        }
        widgets = {"recipients": forms.TextInput()}

    def __init__(self, *args: Any, org: Organization, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.instance.org = org
        if self.instance.pk:  # the kind of an existing channel stays
            del self.fields["kind"]

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        # Keep only the destination the kind uses: a stray value would never be used.
        kind = cleaned.get("kind", self.instance.kind)
        cleaned["url" if kind == AlertChannel.Kind.EMAIL else "recipients"] = ""
        return cleaned


# ---------------------------------------------------------------- the page


def _settings_context(viewer: Viewer, **forms_given: Any) -> dict[str, Any]:
    org = viewer.org
    members = list(
        Membership.objects.filter(org=org).select_related("user", "team").order_by("user__username")
    )
    grantable = {value for value, _ in roles_viewer_may_grant(viewer)}
    rows = [
        {
            "membership": membership,
            # Owners are changed by owners only; nobody changes their own membership.
            "manageable": membership.role in grantable and membership.user_id != viewer.user.pk,
            "form": MemberForm(
                viewer=viewer,
                initial={"role": membership.role, "team": membership.team_id},
                prefix=f"m{membership.pk}",
            ),
        }
        for membership in members
    ]
    invitations = list(
        Invitation.objects.pending()
        .filter(org=org)
        .select_related("team", "invited_by")
        .order_by("-created_at")
    )
    return {
        "org_form": forms_given.get("org_form")
        or OrganizationForm(
            initial={
                "name": org.name,
                "time_zone": org.time_zone,
                "log_request_bodies": org.log_request_bodies,
            }
        ),
        "invite_form": forms_given.get("invite_form") or InviteForm(viewer=viewer),
        "member_rows": rows,
        "invitations": [
            {"invitation": invitation, "revocable": invitation.role in grantable}
            for invitation in invitations
        ],
        "channels": list(AlertChannel.objects.filter(org=org).order_by("name")),
        # One list for every member row's team select (not one query per row).
        "teams": list(Team.objects.filter(org=org).order_by("name")),
        "roles": Role,
    }


def _back(viewer: Viewer, section: str) -> HttpResponse:
    return redirect(f"{viewer.url('dashboard:settings')}#{section}")


@admin_page
def settings_page(request: HttpRequest, viewer: Viewer) -> HttpResponse:
    """Organization, Members, Invitations and Alert channels, on one page."""
    return render_page(request, viewer, "dashboard/settings.html", _settings_context(viewer))


@require_POST
@admin_page
def organization_update(request: HttpRequest, viewer: Viewer) -> HttpResponse:
    """Save the org's name, time zone and body logging."""
    form = OrganizationForm(request.POST)
    if form.is_valid():
        try:
            organization_settings_update(
                org=viewer.org, actor=actor_of(request), **form.cleaned_data
            )
        except ValidationError as error:
            form.add_error(None, error)
        else:
            messages.success(request, "Organization settings saved.")
            return _back(viewer, "organization")
    context = _settings_context(viewer, org_form=form)
    return render_page(request, viewer, "dashboard/settings.html", context, status=400)


@require_POST
@admin_page
def member_update(request: HttpRequest, viewer: Viewer, pk: int) -> HttpResponse:
    """Change one member's role and team (PermissionDenied from the guards is a 403)."""
    membership = get_object_or_404(Membership.objects.select_related("user"), pk=pk, org=viewer.org)
    form = MemberForm(request.POST, viewer=viewer, prefix=f"m{membership.pk}")
    if not form.is_valid():
        # Only a crafted request gets here: the selects offer only valid choices.
        if "role" in form.errors and request.POST.get(f"m{pk}-role") == Role.OWNER:
            raise PermissionDenied("Only owners can make someone an owner.")
        messages.error(request, "Choose a role and a team of this organization.")
        return _back(viewer, "members")
    try:
        membership_change(
            membership=membership,
            role=form.cleaned_data["role"],
            team=form.cleaned_data["team"],
            actor=actor_of(request),
        )
    except ValidationError as error:
        messages.error(request, " ".join(error.messages))
    else:
        messages.success(request, f"{membership.user.get_username()}'s membership updated.")
    return _back(viewer, "members")


@require_POST
@admin_page
def member_remove(request: HttpRequest, viewer: Viewer, pk: int) -> HttpResponse:
    """Remove one member from the organization."""
    membership = get_object_or_404(Membership.objects.select_related("user"), pk=pk, org=viewer.org)
    try:
        membership_remove(membership=membership, actor=actor_of(request))
    except ValidationError as error:
        messages.error(request, " ".join(error.messages))
    else:
        messages.success(request, f"{membership.user.get_username()} was removed.")
    return _back(viewer, "members")


@require_POST
@admin_page
def invitation_new(request: HttpRequest, viewer: Viewer) -> HttpResponse:
    """Create an invitation; the response shows its link, once, and e-mails it if asked."""
    form = InviteForm(request.POST, viewer=viewer)
    if not form.is_valid():
        if request.POST.get("role") == Role.OWNER and viewer.role != Role.OWNER:
            raise PermissionDenied("Only owners can invite owners.")
        context = _settings_context(viewer, invite_form=form)
        return render_page(request, viewer, "dashboard/settings.html", context, status=400)
    issued = invitation_create(
        org=viewer.org,
        email=form.cleaned_data["email"],
        role=form.cleaned_data["role"],
        team=form.cleaned_data["team"],
        actor=actor_of(request),
    )
    link = request.build_absolute_uri(reverse("dashboard:invite_accept", args=[issued.token]))
    emailed = invitation_email_send(invitation=issued.invitation, link=link)
    response = render_page(
        request,
        viewer,
        "dashboard/settings_invitation_created.html",
        {"invitation": issued.invitation, "link": link, "emailed": emailed},
    )
    response["Cache-Control"] = "no-store"
    return response


@require_POST
@admin_page
def invitation_revoke_view(request: HttpRequest, viewer: Viewer, pk: int) -> HttpResponse:
    """Revoke a pending invitation: its link stops working."""
    invitation = get_object_or_404(Invitation, pk=pk, org=viewer.org)
    invitation_revoke(invitation=invitation, actor=actor_of(request))
    messages.success(request, "Invitation revoked: its link no longer works.")
    return _back(viewer, "invitations")


# ---------------------------------------------------------------- alert channels


def _secret_page(
    request: HttpRequest, viewer: Viewer, channel: AlertChannel, secret: str, *, rotated: bool
) -> HttpResponse:
    response = render_page(
        request,
        viewer,
        "dashboard/settings_channel_secret.html",
        {"channel": channel, "secret": secret, "rotated": rotated},
    )
    response["Cache-Control"] = "no-store"
    return response


@admin_page
def channel_new(request: HttpRequest, viewer: Viewer) -> HttpResponse:
    """Add a webhook (its signing secret is shown once) or e-mail channel."""
    form = ChannelForm(request.POST or None, org=viewer.org)
    if request.method == "POST" and form.is_valid():
        channel = form.save(commit=False)
        try:
            secret = alert_channel_create(channel=channel, actor=actor_of(request))
        except ValidationError as refused:  # a webhook URL on our own network
            form.add_error(None, refused)
        else:
            if secret:
                return _secret_page(request, viewer, channel, secret, rotated=False)
            messages.success(request, f"Alert channel '{channel.name}' added.")
            return _back(viewer, "alert-channels")
    status = 400 if request.method == "POST" else 200
    return render_page(
        request, viewer, "dashboard/settings_channel_form.html", {"form": form}, status=status
    )


@admin_page
def channel_edit(request: HttpRequest, viewer: Viewer, pk: int) -> HttpResponse:
    """Change a channel's name, destination and events."""
    channel = get_object_or_404(AlertChannel, pk=pk, org=viewer.org)
    form = ChannelForm(request.POST or None, instance=channel, org=viewer.org)
    if request.method == "POST" and form.is_valid():
        try:
            alert_channel_update(
                channel=channel,
                actor=actor_of(request),
                **{name: value for name, value in form.cleaned_data.items() if name != "kind"},
            )
        except ValidationError as refused:  # a webhook URL on our own network
            form.add_error(None, refused)
        else:
            messages.success(request, f"Alert channel '{form.cleaned_data['name']}' saved.")
            return _back(viewer, "alert-channels")
    status = 400 if request.method == "POST" else 200
    context = {"form": form, "channel": AlertChannel.objects.get(pk=channel.pk)}
    return render_page(
        request, viewer, "dashboard/settings_channel_form.html", context, status=status
    )


@require_POST
@admin_page
def channel_enable(request: HttpRequest, viewer: Viewer, pk: int) -> HttpResponse:
    """Turn a channel on (`enabled=1`) or off (`enabled=0`)."""
    channel = get_object_or_404(AlertChannel, pk=pk, org=viewer.org)
    enabled = request.POST.get("enabled") == "1"
    alert_channel_enable(channel=channel, enabled=enabled, actor=actor_of(request))
    state = "enabled" if enabled else "disabled: it gets no new alerts"
    messages.success(request, f"Alert channel '{channel.name}' {state}.")
    return _back(viewer, "alert-channels")


@require_POST
@admin_page
def channel_rotate(request: HttpRequest, viewer: Viewer, pk: int) -> HttpResponse:
    """Give a webhook a new signing secret, shown once; the old one stops verifying."""
    channel = get_object_or_404(AlertChannel, pk=pk, org=viewer.org, kind=AlertChannel.Kind.WEBHOOK)
    secret = alert_channel_secret_rotate(channel=channel, actor=actor_of(request))
    return _secret_page(request, viewer, channel, secret, rotated=True)


@require_POST
@admin_page
def channel_delete(request: HttpRequest, viewer: Viewer, pk: int) -> HttpResponse:
    """Delete a channel; alerts already recorded stay in the history."""
    channel = get_object_or_404(AlertChannel, pk=pk, org=viewer.org)
    name = channel.name
    alert_channel_delete(channel=channel, actor=actor_of(request))
    messages.success(request, f"Alert channel '{name}' deleted.")
    return _back(viewer, "alert-channels")


@require_POST
@admin_page
def channel_test(request: HttpRequest, viewer: Viewer, pk: int) -> HttpResponse:
    """Send a test alert through the channel now and say how it went."""
    channel = get_object_or_404(AlertChannel, pk=pk, org=viewer.org)
    outcome = alert_channel_test_send(channel=channel, actor=actor_of(request))
    if outcome.delivered:
        status = f" (HTTP {outcome.response_status})" if outcome.response_status else ""
        messages.success(request, f"Test alert delivered to '{channel.name}'{status}.")
    else:
        messages.error(request, f"Test alert to '{channel.name}' failed: {outcome.error}.")
    return _back(viewer, "alert-channels")


urlpatterns = [
    path("settings/", settings_page, name="settings"),
    path("settings/organization/", organization_update, name="settings_organization"),
    path("settings/members/<int:pk>/", member_update, name="settings_member"),
    path("settings/members/<int:pk>/remove/", member_remove, name="settings_member_remove"),
    path("settings/invitations/", invitation_new, name="settings_invite"),
    path(
        "settings/invitations/<int:pk>/revoke/",
        invitation_revoke_view,
        name="settings_invitation_revoke",
    ),
    path("settings/alert-channels/new/", channel_new, name="settings_channel_new"),
    path("settings/alert-channels/<int:pk>/", channel_edit, name="settings_channel"),
    path(
        "settings/alert-channels/<int:pk>/enable/", channel_enable, name="settings_channel_enable"
    ),
    path(
        "settings/alert-channels/<int:pk>/rotate/", channel_rotate, name="settings_channel_rotate"
    ),
    path(
        "settings/alert-channels/<int:pk>/delete/", channel_delete, name="settings_channel_delete"
    ),
    path("settings/alert-channels/<int:pk>/test/", channel_test, name="settings_channel_test"),
]
