"""Reads for tenants."""

from collections import defaultdict

from tenants.contracts import BudgetSpec, KeyContext, ScopeLimits
from tenants.ip_allowlist import ip_allowlist_compile
from tenants.models import Budget, Membership, Organization, VirtualKey

# A key without a model allowlist: one shared empty set.
_ALL_MODELS: frozenset[str] = frozenset()


def one_line(text: str) -> str:
    """Text shown on one line (names in messages, headers and e-mail subjects)."""
    return " ".join(text.split())


def budget_label(budget: Budget) -> str:
    """How people recognise a budget: "Team 'Search' monthly budget" (one line)."""
    team, key = budget.team, budget.key
    return _budget_label(
        scope=budget.scope,
        period=budget.period,
        org_name=budget.org.name,
        team_name=team.name if team is not None else None,
        key_name=key.name if key is not None else None,
        key_prefix=key.prefix if key is not None else None,
    )


def _budget_label(
    *, scope: str, period: str, org_name: str, team_name: str | None, key_name: str | None,
    key_prefix: str | None,
) -> str:  # fmt: skip
    if scope == Budget.Scope.TEAM and team_name is not None:
        owner = f"Team '{team_name}'"
    elif scope == Budget.Scope.KEY and key_name is not None:
        owner = f"Key '{key_name}' ({key_prefix})"
    else:
        owner = f"Organization '{org_name}'"
    return one_line(f"{owner} {period} budget")


def _budget_specs() -> dict[tuple[str, int], list[BudgetSpec]]:
    """Every budget, by what it limits: ("org", id), ("team", id) or ("key", id).

    Read as plain rows (no model instances): with a budget per key there are as
    many budgets as keys, and the snapshot is built in every web process.
    """
    specs: dict[tuple[str, int], list[BudgetSpec]] = defaultdict(list)
    rows = Budget.objects.order_by("pk").values_list(
        "pk", "scope", "period", "limit_nanos", "enforcement", "created_at", "org_id",
        "team_id", "key_id", "org__name", "org__time_zone", "team__name", "key__name",
        "key__prefix",
    )  # fmt: skip
    time_zones: dict[str, str] = {}
    for (budget_id, scope, period, limit_nanos, enforcement, created_at, org_id, team_id,
         key_id, org_name, time_zone, team_name, key_name, key_prefix) in rows.iterator(
            chunk_size=2000
         ):  # fmt: skip
        target = {"team": team_id, "key": key_id}.get(scope, org_id)
        specs[(scope, target)].append(
            BudgetSpec(
                budget_id=budget_id,
                scope=scope,
                label=_budget_label(
                    scope=scope,
                    period=period,
                    org_name=org_name,
                    team_name=team_name,
                    key_name=key_name,
                    key_prefix=key_prefix,
                ),  # fmt: skip
                period=period,
                time_zone=time_zones.setdefault(time_zone, time_zone),
                limit_nanos=limit_nanos,
                hard=enforcement == Budget.Enforcement.HARD,
                created_at=created_at,
            )
        )
    return specs


def virtual_key_contexts() -> list[KeyContext]:
    """Every key that is not revoked, as the proxy's snapshot needs it (two queries),
    with the rate limits and budgets that apply to its requests.

    Expired keys are included so the proxy can say "expired" rather than "invalid".
    Every web process holds one context per key, so what keys share (their org's and
    team's limits, budgets and names) is built once and shared, and rows are read in
    chunks rather than all at once: memory per key, not per key times rows in flight.
    """
    rows = VirtualKey.objects.filter(revoked_at__isnull=True).values_list(
        "id", "prefix", "secret_hash", "name", "org_id", "org__slug", "team_id",
        "allowed_models", "expires_at", "rpm_limit", "tpm_limit", "team__name",
        "team__rpm_limit", "team__tpm_limit", "org__rpm_limit", "org__tpm_limit",
        "org__log_request_bodies", "allowed_ips",
    )  # fmt: skip
    budgets = _budget_specs()
    shared_limits: dict[tuple[str, int], ScopeLimits] = {}
    shared_budgets: dict[tuple[int, int | None], tuple[BudgetSpec, ...]] = {}
    org_slugs: dict[str, str] = {}

    def scope_limits(
        scope: str, scope_id: int, name: str, rpm: int | None, tpm: int | None
    ) -> ScopeLimits:
        limits = shared_limits.get((scope, scope_id))
        if limits is None:
            label = f"{'organization' if scope == 'org' else scope} '{name}'"
            limits = shared_limits[(scope, scope_id)] = ScopeLimits(
                scope, scope_id, label, rpm, tpm
            )
        return limits

    contexts = []
    for (key_id, prefix, secret_hash, name, org_id, org_slug, team_id, allowed_models,
         expires_at, key_rpm, key_tpm, team_name, team_rpm, team_tpm, org_rpm,
         org_tpm, log_request_bodies, allowed_ips) in rows.iterator(chunk_size=2000):  # fmt: skip
        org_slug = org_slugs.setdefault(org_slug, org_slug)
        scopes = [
            ScopeLimits("key", key_id, f"key '{one_line(name)}' ({prefix})", key_rpm, key_tpm),
            scope_limits("org", org_id, org_slug, org_rpm, org_tpm),
        ]
        if team_id is not None:
            scopes.insert(1, scope_limits("team", team_id, one_line(team_name), team_rpm, team_tpm))
        shared = shared_budgets.get((org_id, team_id))
        if shared is None:
            shared = shared_budgets[(org_id, team_id)] = tuple(
                budgets.get(("org", org_id), [])
                + (budgets.get(("team", team_id), []) if team_id is not None else [])
            )
        own_budgets = budgets.get(("key", key_id))
        contexts.append(
            KeyContext(
                key_id=key_id,
                prefix=prefix,
                secret_hash=secret_hash,
                name=name,
                org_id=org_id,
                org_slug=org_slug,
                team_id=team_id,
                allowed_models=frozenset(allowed_models) if allowed_models else _ALL_MODELS,
                expires_at=expires_at,
                limits=tuple(s for s in scopes if s.rpm is not None or s.tpm is not None),
                budgets=shared + tuple(own_budgets) if own_budgets else shared,
                log_request_bodies=log_request_bodies,
                ip_allowlist=ip_allowlist_compile(allowed_ips) if allowed_ips else None,
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
