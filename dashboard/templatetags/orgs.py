"""URLs of dashboard pages for the organization being viewed."""

from typing import Any

from django import template

register = template.Library()


@register.simple_tag(takes_context=True)
def org_url(context: dict[str, Any], name: str, *args: object, **query: object) -> str:
    """`{% org_url 'dashboard:keys_detail' key.pk status='active' %}` → /…/?org=<slug>&…"""
    return context["viewer"].url(name, *args, **query)
