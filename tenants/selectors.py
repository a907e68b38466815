"""Reads for tenants."""

from collections import defaultdict

from tenants.contracts import BudgetSpec, KeyContext, ScopeLimits
from tenants.models import Budget, Membership, Organization, VirtualKey


def one_line(text: str) -> str:
    """Text shown on one line (names in messages, headers and e-mail subjects)."""
    return " ".join(text.split())


def budget_label(budget: Budget) -> str:
    """How people recognise a budget: "Team 'Search' monthly budget" (one line)."""
    if budget.scope == Budget.Scope.TEAM and budget.team is not None:
        owner = f"Team '{budget.team.name}'"
    elif budget.scope == Budget.Scope.KEY and budget.key is not None:
        owner = f"Key '{budget.key.name}' ({budget.key.prefix})"
    else:
        owner = f"Organization '{budget.org.name}'"
    return one_line(f"{owner} {budget.period} budget")


def _budget_specs() -> dict[tuple[str, int], list[BudgetSpec]]:
    """Every budget, by what it limits: ("org", id), ("team", id) or ("key", id)."""
    specs: dict[tuple[str, int], list[BudgetSpec]] = defaultdict(list)
    for budget in Budget.objects.select_related("org", "team", "key").order_by("pk"):
        target = {"team": budget.team_id, "key": budget.key_id}.get(budget.scope, budget.org_id)
        specs[(budget.scope, target)].append(
            BudgetSpec(
                budget_id=budget.pk,
                scope=budget.scope,
                label=budget_label(budget),
                period=budget.period,
                time_zone=budget.org.time_zone,
                limit_nanos=budget.limit_nanos,
                hard=budget.enforcement == Budget.Enforcement.HARD,
                created_at=budget.created_at,
            )
        )
    return specs


def virtual_key_contexts() -> list[KeyContext]:
    """Every key that is not revoked, as the proxy's snapshot needs it (two queries),
    with the rate limits and budgets that apply to its requests.

    Expired keys are included so the proxy can say "expired" rather than "invalid".
    """
    rows = VirtualKey.objects.filter(revoked_at__isnull=True).values_list(
        "id", "prefix", "secret_hash", "name", "org_id", "org__slug", "team_id",
        "allowed_models", "expires_at", "rpm_limit", "tpm_limit", "team__name",
        "team__rpm_limit", "team__tpm_limit", "org__rpm_limit", "org__tpm_limit",
        "org__log_request_bodies",
    )  # fmt: skip
    budgets = _budget_specs()
    contexts = []
    for (key_id, prefix, secret_hash, name, org_id, org_slug, team_id, allowed_models,
         expires_at, key_rpm, key_tpm, team_name, team_rpm, team_tpm, org_rpm,
         org_tpm, log_request_bodies) in rows:  # fmt: skip
        scopes = [
            ScopeLimits("key", key_id, f"key '{one_line(name)}' ({prefix})", key_rpm, key_tpm),
            ScopeLimits("org", org_id, f"organization '{org_slug}'", org_rpm, org_tpm),
        ]
        if team_id is not None:
            scopes.insert(
                1,
                ScopeLimits("team", team_id, f"team '{one_line(team_name)}'", team_rpm, team_tpm),
            )
        contexts.append(
            KeyContext(
                key_id=key_id,
                prefix=prefix,
                secret_hash=secret_hash,
                name=name,
                org_id=org_id,
                org_slug=org_slug,
                team_id=team_id,
                allowed_models=frozenset(allowed_models or ()),
                expires_at=expires_at,
                limits=tuple(s for s in scopes if s.rpm is not None or s.tpm is not None),
                budgets=tuple(
                    budgets.get(("org", org_id), [])
                    + (budgets.get(("team", team_id), []) if team_id is not None else [])
                    + budgets.get(("key", key_id), [])
                ),
                log_request_bodies=log_request_bodies,
            )
        )
    return contexts


def organizations_for_user(*, user: object) -> list[Organization]:
    """Organizations the user may open in the dashboard (all of them for superusers)."""
    if getattr(user, "is_superuser", False):
        return list(Organization.objects.order_by("name"))
    return list(Organization.objects.filter(memberships__user=user).order_by("name"))


def membership_role(*, user: object, org: Organization) -> str | None:
    """The user's role in `org`, "owner" for superusers, None for outsiders."""
    if getattr(user, "is_superuser", False):
        return Membership.Role.OWNER
    return Membership.objects.filter(user=user, org=org).values_list("role", flat=True).first()
