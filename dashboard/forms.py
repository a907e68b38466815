"""What every dashboard form shares: who is acting, labels as written, teams by name."""

from typing import Any

from django import forms
from django.http import HttpRequest

from tenants.models import Team
from tenants.services import Actor


def actor_of(request: HttpRequest) -> Actor:
    """The signed-in user making a change, with their address for the audit log."""
    return Actor(user=request.user, ip_address=request.META.get("REMOTE_ADDR"))  # type: ignore[arg-type]


class DashboardForm(forms.Form):
    """Labels read as written ("Name", not "Name:"): pages and tests find fields by them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("label_suffix", "")
        super().__init__(*args, **kwargs)


class TeamChoiceField(forms.ModelChoiceField):
    """Teams by name: str(team) reads its org, one query per option."""

    def label_from_instance(self, obj: Team) -> str:  # type: ignore[override]
        return obj.name
