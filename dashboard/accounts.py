"""Signing in and out of the dashboard, and accepting an invitation link.

Sign-in is Django's LoginView (any active user; the admin's login admits staff
only), limited per client address exactly like the admin's. LoginView keeps
`next` on this site (no open redirects) and rotates the session on sign-in;
sign-out is POST only and clears the session.
"""

from typing import Any

from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.forms import UserCreationForm
from django.contrib.auth.views import LoginView, LogoutView
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import path, reverse
from django.utils.http import urlencode
from django.views.decorators.cache import never_cache
from django_ratelimit.decorators import ratelimit

from dashboard.forms import actor_of
from tenants.members import (
    InvitationUnusable,
    invitation_accept,
    invitation_by_token,
    invitation_sign_up,
)
from tenants.models import Invitation
from tenants.services import Actor

# The same brute-force guard as the admin's sign-in (gatewaysite/urls.py): the 11th
# POST in a minute from one address gets 429 (gatewaysite.views.rate_limited).
sign_in_rate_limit = ratelimit(key="ip", rate="10/m", method="POST", block=True)

sign_in = sign_in_rate_limit(
    LoginView.as_view(
        template_name="dashboard/accounts/sign_in.html", redirect_authenticated_user=True
    )
)
sign_out = LogoutView.as_view(next_page="dashboard:sign_in")


class SignUpForm(UserCreationForm):
    """Username, password and its confirmation, checked by Django's password validators."""

    def __init__(self, *args: Any, email: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The similarity validator compares the password with the invited address too.
        self.instance.email = email


def _unusable(request: HttpRequest, *, status: int) -> HttpResponse:
    """One page for every link that does not work; nothing about the org or the invitation."""
    return render(
        request, "dashboard/accounts/invite_invalid.html", {"status": status}, status=status
    )


def _joined(request: HttpRequest, invitation: Invitation, joined: bool, role: str) -> HttpResponse:
    org = invitation.org
    if joined:
        messages.success(request, f"Welcome to {org.name}: you joined as {role.lower()}.")
    else:
        messages.info(
            request, f"You are already a member of {org.name} ({role.lower()}); nothing changed."
        )
    return redirect(f"{reverse('dashboard:overview')}?{urlencode({'org': org.slug})}")


@never_cache
@sign_in_rate_limit
def invite_accept(request: HttpRequest, token: str) -> HttpResponse:
    """Show an invitation (org and role); a signed-in user accepts, a visitor signs up first."""
    invitation = invitation_by_token(token)
    if invitation is None:
        return _unusable(request, status=404)
    if invitation.status != Invitation.Status.PENDING:
        return _unusable(request, status=410)
    signed_in = request.user.is_authenticated
    form = None if signed_in else SignUpForm(email=invitation.email)
    if request.method == "POST":
        try:
            if signed_in:
                acceptance = invitation_accept(
                    invitation=invitation, user=request.user, actor=actor_of(request)
                )
                return _joined(
                    request, invitation, acceptance.joined, acceptance.membership.get_role_display()
                )
            form = SignUpForm(request.POST, email=invitation.email)
            if form.is_valid():
                acceptance = invitation_sign_up(
                    invitation=invitation,
                    username=form.cleaned_data["username"],
                    password=form.cleaned_data["password1"],
                    actor=Actor(ip_address=request.META.get("REMOTE_ADDR")),
                )
                login(request, acceptance.membership.user)  # rotates the session
                return _joined(request, invitation, True, acceptance.membership.get_role_display())
        except InvitationUnusable:
            return _unusable(request, status=410)
    sign_in_url = f"{reverse('dashboard:sign_in')}?{urlencode({'next': request.path})}"
    return render(
        request,
        "dashboard/accounts/invite_accept.html",
        {"invitation": invitation, "form": form, "sign_in_url": sign_in_url},
    )


urlpatterns = [
    path("sign-in/", sign_in, name="sign_in"),
    path("sign-out/", sign_out, name="sign_out"),
    path("invite/<str:token>/", invite_accept, name="invite_accept"),
]
