"""A LiteLLM proxy `config.yaml`, translated into a Tollgate configuration file.

LiteLLM's `model_list` entries that share a `model_name` become one route whose
deployments are load-balanced; entries that share a provider, address, key and API
version become one provider. `router_settings` and `litellm_settings` give the routes'
strategy, retries, timeouts, fallbacks, parameter dropping and caching. Everything
Tollgate does not carry over is reported as a warning, never dropped silently. Secrets
are never copied: `os.environ/NAME` becomes `${NAME}`, and a key written in the file
becomes a reference to a variable the warning names.

The format is LiteLLM's documented one (docs.litellm.ai: proxy/configs,
proxy/config_settings, routing, proxy/reliability).
"""

import re
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit

from tenants.api.fields import MAX_INT

from .loader import InvalidConfig, Problem
from .schema import FORMAT_VERSION

# LiteLLM's provider prefix (`azure/…`) -> Tollgate's provider kind.
PROVIDER_KINDS = {
    "openai": "openai",
    "azure": "azure",
    "azure_ai": "openai_compatible",
    "openai_like": "openai_compatible",
    "custom_openai": "openai_compatible",
    "anthropic": "anthropic",
    "gemini": "gemini",
    "groq": "groq",
    "together_ai": "together",
    "mistral": "mistral",
    "deepseek": "deepseek",
    "fireworks_ai": "fireworks",
    "openrouter": "openrouter",
    "hosted_vllm": "vllm",
    "vllm": "vllm",
    "ollama": "ollama",
    "ollama_chat": "ollama",
    "lm_studio": "lmstudio",
}
# The variable LiteLLM reads a kind's key from when the entry gives none.
DEFAULT_KEY_ENV = {
    "openai": "OPENAI_API_KEY",
    "azure": "AZURE_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "gemini": "GEMINI_API_KEY",
    "groq": "GROQ_API_KEY",
    "together": "TOGETHERAI_API_KEY",
    "mistral": "MISTRAL_API_KEY",
    "deepseek": "DEEPSEEK_API_KEY",
    "fireworks": "FIREWORKS_AI_API_KEY",
    "openrouter": "OPENROUTER_API_KEY",
}
STRATEGIES = {
    "simple-shuffle": "weighted",
    "least-busy": "least_busy",
    "usage-based-routing": "usage_aware",
    "usage-based-routing-v2": "usage_aware",
    "latency-based-routing": "least_latency",
    "cost-based-routing": "lowest_cost",
}
AZURE_DEFAULT_API_VERSION = "2024-10-21"
LITELLM_DEFAULT_RETRIES = 2
CACHE_DEFAULT_TTL_SECONDS = 600

# Entry keys read here; any other is reported.
_PARAMS_READ = {
    "model", "api_base", "api_key", "api_version", "rpm", "tpm", "weight", "order", "timeout",
    "ttft_timeout", "stream_idle_timeout", "drop_params", "input_cost_per_token",
    "output_cost_per_token", "cache_read_input_token_cost",
}  # fmt: skip
_MODEL_INFO_READ = {
    "id", "input_cost_per_token", "output_cost_per_token", "cache_read_input_token_cost",
}  # fmt: skip
_ROUTER_READ = {
    "routing_strategy", "num_retries", "timeout", "fallbacks", "default_fallbacks",
    "ttft_timeout", "stream_idle_timeout",
}  # fmt: skip
_LITELLM_READ = {
    "fallbacks", "default_fallbacks", "num_retries", "request_timeout", "drop_params", "cache",
    "cache_params",
}  # fmt: skip
_HINTS = {
    "max_retries": "Tollgate retries per route (max_attempts), not per deployment",
    "stream_timeout": "Tollgate has one total timeout for streamed and other calls "
    "(total_timeout_ms, from timeout)",
    "max_parallel_requests": "use the deployment's rpm_limit, or the least_busy strategy",
    "tags": "tag-based routing is not supported",
    "master_key": "Tollgate issues its own virtual keys (manage.py createkey, the dashboard)",
    "database_url": "Tollgate reads DATABASE_URL",
    "redis_host": "Tollgate reads REDIS_URL",
    "redis_port": "Tollgate reads REDIS_URL",
    "redis_password": "Tollgate reads REDIS_URL",
    "redis_url": "Tollgate reads REDIS_URL",
    "allowed_fails": "circuit breakers: TOLLGATE_BREAKER_FAILURES",
    "cooldown_time": "circuit breakers: TOLLGATE_BREAKER_COOLDOWN_SECONDS",
    "context_window_fallbacks": "Tollgate sends a request too long for a deployment to one "
    "with a larger context_window_tokens, then to the route's fallbacks",
    "enable_pre_call_checks": "Tollgate always checks deployment limits and context windows",
    "model_group_alias": "give each name its own route",
    "success_callback": "Tollgate meters every request in its own ledger",
    "failure_callback": "Tollgate meters every request in its own ledger",
    "callbacks": "Tollgate meters every request in its own ledger",
    "mode": "descriptive: not needed",
    "base_model": "descriptive: prices come from the catalog or the file's prices",
}


@dataclass
class LiteLLMImport:
    document: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def litellm_config_translate(raw: Any, *, org_slug: str) -> LiteLLMImport:
    """Our configuration document for `org_slug` from a parsed LiteLLM config.

    Raises InvalidConfig when the file is not a LiteLLM config Tollgate can read.
    """
    return _Translator(org_slug).translate(raw)


@dataclass
class _Deployment:
    path: str
    model_name: str
    provider: dict[str, Any]
    values: dict[str, Any]
    weight: Decimal | None
    drop_params: bool


class _Translator:
    def __init__(self, org_slug: str) -> None:
        self.org_slug = org_slug
        self.problems: list[Problem] = []
        self.warnings: list[str] = []
        # (section, key) -> entries that set it, for one warning per key.
        self.unread: dict[tuple[str, str], list[str]] = defaultdict(list)

    def translate(self, raw: Any) -> LiteLLMImport:
        if not isinstance(raw, dict) or not isinstance(raw.get("model_list"), list):
            raise InvalidConfig([Problem("model_list", "a LiteLLM config needs a model_list")])
        router = self.section(raw, "router_settings")
        settings = self.section(raw, "litellm_settings")
        for name in raw:
            if name in ("model_list", "router_settings", "litellm_settings"):
                continue
            if name == "general_settings" and isinstance(raw[name], dict):
                for key in raw[name]:
                    self.unread[("general_settings", str(key))].append(name)
            elif name == "environment_variables":
                self.warn(f"{name}: not imported; set them in Tollgate's environment")
            else:
                self.warn(f"{name}: not imported")
        for key in router:
            if key not in _ROUTER_READ:
                self.unread[("router_settings", key)].append("router_settings")
        for key in settings:
            if key not in _LITELLM_READ:
                self.unread[("litellm_settings", key)].append("litellm_settings")
        default_timeout = router.get("timeout", settings.get("request_timeout"))
        defaults = {
            "total_timeout_ms": self.milliseconds(default_timeout, "router_settings.timeout"),
            "ttft_timeout_ms": self.milliseconds(
                router.get("ttft_timeout"), "router_settings.ttft_timeout"
            ),
            "read_timeout_ms": self.milliseconds(
                router.get("stream_idle_timeout"), "router_settings.stream_idle_timeout"
            ),
        }
        self.providers: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        self.deployment_names: set[str] = set()
        deployments: list[_Deployment] = []
        prices: dict[tuple[str, str], dict[str, Any]] = {}
        for index, entry in enumerate(raw["model_list"]):
            deployment = self.entry(entry, f"model_list[{index}]", defaults, prices)
            if deployment is not None:
                deployments.append(deployment)
        if self.problems:
            raise InvalidConfig(self.problems)
        if not deployments:
            raise InvalidConfig([Problem("model_list", "no model Tollgate can serve")])
        routes = self.routes(deployments, router, settings)
        self.name_providers()
        self.report_unread()
        org: dict[str, Any] = {
            "slug": self.org_slug,
            "providers": list(self.providers.values()),
            "routes": routes,
        }
        if prices:
            org["prices"] = list(prices.values())
        document = {"version": FORMAT_VERSION, "organizations": [org]}
        return LiteLLMImport(document=document, warnings=self.warnings)

    # --- helpers ---

    def section(self, raw: dict[str, Any], name: str) -> dict[str, Any]:
        value = raw.get(name) or {}
        if not isinstance(value, dict):
            self.problems.append(Problem(name, "expected a mapping"))
            return {}
        return value

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def number(self, value: Any, path: str) -> Decimal | None:
        if value is None:
            return None
        if isinstance(value, str) and value.startswith("os.environ/"):
            self.warn(f"{path}: numbers from the environment are not imported")
            return None
        if isinstance(value, bool):
            self.warn(f"{path}: not a number; not imported")
            return None
        try:
            number = Decimal(str(value).strip())
        except InvalidOperation:
            self.warn(f"{path}: not a number; not imported")
            return None
        return number if number.is_finite() else None

    def whole(self, value: Any, path: str, minimum: int) -> int | None:
        number = self.number(value, path)
        if number is None:
            return None
        if number != number.to_integral_value() or not minimum <= number <= MAX_INT:
            self.warn(f"{path}: expected a whole number from {minimum}; not imported")
            return None
        return int(number)

    def milliseconds(self, seconds: Any, path: str) -> int | None:
        number = self.number(seconds, path)
        if number is None:
            return None
        if not 0 < number * 1000 <= MAX_INT:
            self.warn(f"{path}: a timeout must be above 0 seconds; not imported")
            return None
        return max(1, int(number * 1000))

    def text(self, value: Any) -> str:
        """A LiteLLM string, `os.environ/NAME` written as our `${NAME}`."""
        text = str(value)
        if text.startswith("os.environ/"):
            return "${" + text.removeprefix("os.environ/") + "}"
        return text

    # --- model_list entries ---

    def entry(
        self,
        entry: Any,
        path: str,
        defaults: dict[str, int | None],
        prices: dict[tuple[str, str], dict[str, Any]],
    ) -> _Deployment | None:
        if not isinstance(entry, dict):
            self.problems.append(Problem(path, "expected a mapping"))
            return None
        params = entry.get("litellm_params")
        model_name = entry.get("model_name")
        if not isinstance(model_name, str) or not model_name.strip():
            self.problems.append(Problem(f"{path}.model_name", "required"))
            return None
        if not isinstance(params, dict) or not isinstance(params.get("model"), str):
            self.problems.append(Problem(f"{path}.litellm_params.model", "required"))
            return None
        if "*" in model_name:
            self.warn(f"{path}: wildcard model names ({model_name!r}) are not supported; skipped")
            return None
        info = entry.get("model_info") or {}
        if not isinstance(info, dict):
            info = {}
        for key in entry:
            if key not in ("model_name", "litellm_params", "model_info", "rpm", "tpm"):
                self.unread[("model_list[]", key)].append(path)
        for key in params:
            if key not in _PARAMS_READ:
                self.unread[("model_list[].litellm_params", key)].append(path)
        for key in info:
            if key not in _MODEL_INFO_READ:
                self.unread[("model_list[].model_info", key)].append(path)
        kind, upstream = self.kind_and_model(params["model"], f"{path}.litellm_params.model")
        if kind is None:
            return None
        provider = self.provider(kind, params, f"{path}.litellm_params")
        name = self.deployment_name(info.get("id"), model_name)
        values: dict[str, Any] = {"upstream_model": upstream}
        where = f"{path}.litellm_params"
        for ours, theirs in (("rpm_limit", "rpm"), ("tpm_limit", "tpm")):
            value = params.get(theirs, entry.get(theirs))
            if value is not None:
                limit = self.whole(value, f"{where}.{theirs}", 1)
                if limit is not None:
                    values[ours] = limit
        if params.get("order") is not None:
            order = self.whole(params["order"], f"{where}.order", 0)
            if order is not None:
                values["priority"] = order
        timeouts = {
            "total_timeout_ms": self.milliseconds(params.get("timeout"), f"{where}.timeout"),
            "ttft_timeout_ms": self.milliseconds(
                params.get("ttft_timeout"), f"{where}.ttft_timeout"
            ),
            "read_timeout_ms": self.milliseconds(
                params.get("stream_idle_timeout"), f"{where}.stream_idle_timeout"
            ),
        }
        for field_name, value in timeouts.items():
            chosen = value if value is not None else defaults[field_name]
            if chosen is not None:
                values[field_name] = chosen
        weight = self.number(params.get("weight"), f"{where}.weight")
        if weight is not None and weight < 0:
            self.warn(f"{where}.weight: must not be negative; not imported")
            weight = None
        self.price(kind, upstream, params, info, path, prices)
        return _Deployment(
            path=path,
            model_name=model_name,
            provider=provider,
            values={"name": name, **values},
            weight=weight,
            drop_params=params.get("drop_params") is True,
        )

    def kind_and_model(self, model: str, path: str) -> tuple[str | None, str]:
        prefix, _, rest = model.partition("/")
        if rest and prefix in PROVIDER_KINDS:
            return PROVIDER_KINDS[prefix], rest
        if rest and re.fullmatch(r"[a-z0-9_\-]+", prefix) and prefix not in ("models",):
            self.warn(f"{path}: LiteLLM provider {prefix!r} is not supported by Tollgate; skipped")
            return None, model
        # No provider prefix: LiteLLM infers it from well-known model names.
        lowered = model.lower()
        if lowered.startswith(("gpt-", "o1", "o3", "o4", "chatgpt", "text-embedding")):
            return "openai", model
        if lowered.startswith("claude"):
            return "anthropic", model
        if lowered.startswith("gemini"):
            return "gemini", model
        self.warn(f"{path}: cannot tell the provider of {model!r}; write provider/model. Skipped")
        return None, model

    def provider(self, kind: str, params: dict[str, Any], path: str) -> dict[str, Any]:
        base_url = self.text(params["api_base"]) if params.get("api_base") else ""
        if kind == "ollama" and base_url and not base_url.rstrip("/").endswith("/v1"):
            base_url = base_url.rstrip("/") + "/v1"  # Tollgate speaks Ollama's OpenAI API
        if kind == "azure" and not base_url:
            base_url = "${AZURE_API_BASE}"  # where LiteLLM looks when an entry gives none
        api_version = self.text(params["api_version"]) if params.get("api_version") else ""
        if kind == "azure" and not api_version:
            api_version = AZURE_DEFAULT_API_VERSION
            self.warn(f"{path}: no api_version; Tollgate uses {AZURE_DEFAULT_API_VERSION}")
        api_key = self.credential(kind, params.get("api_key"), path)
        group = (kind, base_url, api_key or "", api_version)
        if group not in self.providers:
            entry: dict[str, Any] = {"name": "", "kind": kind}  # named once all are known
            if base_url:
                entry["base_url"] = base_url
            if api_version:
                entry["api_version"] = api_version
            if api_key:
                entry["api_key"] = api_key
            entry["deployments"] = []
            self.providers[group] = entry
        return self.providers[group]

    def credential(self, kind: str, value: Any, path: str) -> str | None:
        if value is None:
            env_var = DEFAULT_KEY_ENV.get(kind)
            if env_var is None:
                return None
            self.warn(f"{path}: no api_key; Tollgate reads ${env_var}, as LiteLLM would")
            return "${" + env_var + "}"
        text = str(value)
        if text.startswith("os.environ/"):
            return self.text(text)
        # Never copy a secret into another file: name the variable it must go in.
        env_var = f"TOLLGATE_{kind.upper()}_API_KEY"
        self.warn(
            f"{path}.api_key: a key written in the LiteLLM file is not copied; put it in "
            f"the environment variable {env_var}"
        )
        return "${" + env_var + "}"

    def name_providers(self) -> None:
        """Name each provider after its kind; several of one kind, after their addresses too
        (`azure-westeurope` from AZURE_WESTEUROPE_API_BASE or westeurope.example.com)."""
        by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for entry in self.providers.values():
            by_kind[entry["kind"]].append(entry)
        taken: set[str] = set()
        for kind, entries in by_kind.items():
            for entry in entries:
                name = kind
                if len(entries) > 1:
                    where = _address_words(entry.get("base_url", ""), kind)
                    name = f"{kind}-{where}" if where else kind
                candidate, suffix = name, 2
                while candidate in taken:
                    candidate = f"{name}-{suffix}"
                    suffix += 1
                taken.add(candidate)
                entry["name"] = candidate[:200]

    def deployment_name(self, given: Any, model_name: str) -> str:
        base = str(given) if isinstance(given, str | int) and str(given).strip() else model_name
        base = base[:190]
        name, suffix = base, 2
        while name in self.deployment_names:
            name = f"{base}-{suffix}"
            suffix += 1
        self.deployment_names.add(name)
        return name

    def price(
        self,
        kind: str,
        upstream: str,
        params: dict[str, Any],
        info: dict[str, Any],
        path: str,
        prices: dict[tuple[str, str], dict[str, Any]],
    ) -> None:
        costs = {}
        for ours, theirs in (
            ("input_usd_per_mtok", "input_cost_per_token"),
            ("output_usd_per_mtok", "output_cost_per_token"),
            ("cached_input_usd_per_mtok", "cache_read_input_token_cost"),
        ):
            value = params.get(theirs, info.get(theirs))
            if value is None:
                continue
            per_token = self.number(value, f"{path}.litellm_params.{theirs}")
            if per_token is None:
                return
            rate = (per_token * 1_000_000).normalize()
            if rate < 0 or rate != rate.quantize(Decimal("0.000001")):
                self.warn(f"{path}: {theirs} is finer than Tollgate's prices hold; not imported")
                return
            costs[ours] = f"{rate:f}"
        if not costs:
            return
        if "input_usd_per_mtok" not in costs or "output_usd_per_mtok" not in costs:
            self.warn(f"{path}: a price needs both input and output costs; not imported")
            return
        key = (kind, upstream)
        entry = {"provider_kind": kind, "model": upstream, **costs}
        if key in prices and prices[key] != entry:
            self.warn(f"{path}: another entry prices {kind}/{upstream} differently; first kept")
            return
        prices[key] = entry

    # --- routes ---

    def routes(
        self, deployments: list[_Deployment], router: dict[str, Any], settings: dict[str, Any]
    ) -> list[dict[str, Any]]:
        groups: dict[str, list[_Deployment]] = defaultdict(list)
        for deployment in deployments:
            groups[deployment.model_name].append(deployment)
        known = set(groups)
        strategy_name = router.get("routing_strategy", "simple-shuffle")
        strategy = STRATEGIES.get(str(strategy_name))
        if strategy is None:
            self.warn(
                f"router_settings.routing_strategy: {strategy_name!r} is not supported; "
                "weighted is used"
            )
            strategy = "weighted"
        fallbacks = self.fallbacks(router, settings, known)
        section = "router_settings" if "num_retries" in router else "litellm_settings"
        retries = router.get("num_retries", settings.get("num_retries"))
        num_retries = LITELLM_DEFAULT_RETRIES
        if retries is not None:
            whole = self.whole(retries, f"{section}.num_retries", 0)
            num_retries = LITELLM_DEFAULT_RETRIES if whole is None else whole
        drop_all = settings.get("drop_params") is True
        cache_ttl = self.cache_ttl(settings)
        routes = []
        for model_name, members in groups.items():
            route_strategy = strategy
            orders = {d.values.get("priority") for d in members}
            if len(members) > 1 and orders != {None}:
                route_strategy = "priority"
                if strategy != "priority" and len(orders) < len(members):
                    self.warn(
                        f"route {model_name!r}: LiteLLM shares load among deployments with "
                        "the same order; Tollgate's priority strategy tries them by name"
                    )
            self.weights(members, by_limits=route_strategy == "weighted")
            for deployment in members:
                deployment.provider["deployments"].append(deployment.values)
            route_fallbacks = fallbacks.get(model_name, [])
            route: dict[str, Any] = {
                "model_name": model_name,
                "strategy": route_strategy,
                "deployments": [d.values["name"] for d in members],
                "fallbacks": route_fallbacks,
                "max_attempts": min(32767, 1 + num_retries + len(route_fallbacks)),
                "unsupported_params": (
                    "drop" if drop_all or any(d.drop_params for d in members) else "reject"
                ),
            }
            if cache_ttl:
                route["cache_ttl_seconds"] = cache_ttl
            routes.append(route)
        return routes

    def weights(self, members: list[_Deployment], *, by_limits: bool) -> None:
        """LiteLLM's shuffle weighs by `weight`, else by rpm, else by tpm. Its weights may
        be fractions; Tollgate's are whole: scale them alike."""
        if by_limits and all(d.weight is None for d in members):
            for limit in ("rpm_limit", "tpm_limit"):
                if len(members) > 1 and all(limit in d.values for d in members):
                    for deployment in members:
                        deployment.weight = Decimal(deployment.values[limit])
                    break
        weights = [d.weight for d in members if d.weight is not None]
        if not weights:
            return
        scale = 1
        while scale < 10**6 and any(w * scale != (w * scale).to_integral_value() for w in weights):
            scale *= 10
        for deployment in members:
            if deployment.weight is not None:
                deployment.values["weight"] = int((deployment.weight * scale).to_integral_value())

    def fallbacks(
        self, router: dict[str, Any], settings: dict[str, Any], known: set[str]
    ) -> dict[str, list[str]]:
        chosen: dict[str, list[str]] = {}
        for section, source in (("litellm_settings", settings), ("router_settings", router)):
            listing = source.get("fallbacks") or []
            if not isinstance(listing, list):
                self.warn(f"{section}.fallbacks: expected a list; not imported")
                continue
            for index, item in enumerate(listing):
                if not isinstance(item, dict):
                    self.warn(f"{section}.fallbacks[{index}]: expected {{model: [fallbacks]}}")
                    continue
                for model_name, targets in item.items():
                    names = targets if isinstance(targets, list) else [targets]
                    # router_settings wins over litellm_settings, as in LiteLLM's proxy.
                    chosen[str(model_name)] = self.known_fallbacks(
                        str(model_name), names, known, f"{section}.fallbacks[{index}]"
                    )
        for section, source in (("litellm_settings", settings), ("router_settings", router)):
            defaults = source.get("default_fallbacks")
            if isinstance(defaults, list):
                for model_name in known:
                    if model_name not in chosen:
                        chosen[model_name] = self.known_fallbacks(
                            model_name, defaults, known, f"{section}.default_fallbacks"
                        )
        for model_name in list(chosen):
            if model_name not in known:
                self.warn(f"fallbacks for {model_name!r}: no such model_name; not imported")
                del chosen[model_name]
        return chosen

    def known_fallbacks(
        self, model_name: str, names: list[Any], known: set[str], path: str
    ) -> list[str]:
        kept = []
        for name in names:
            name = str(name)
            if name == model_name or name in kept:
                continue
            if name not in known:
                self.warn(f"{path}: fallback {name!r} is no model_name of this file; not imported")
                continue
            kept.append(name)
        return kept[:20]

    def cache_ttl(self, settings: dict[str, Any]) -> int | None:
        if settings.get("cache") is not True:
            return None
        params = settings.get("cache_params") or {}
        if not isinstance(params, dict):
            params = {}
        if params.get("mode") == "default_off":
            self.warn(
                "litellm_settings.cache_params.mode: default_off is not supported; routes are "
                "not cached (set cache_ttl_seconds on the ones to cache)"
            )
            return None
        ignored = sorted(key for key in params if key not in ("ttl", "mode"))
        if ignored:
            self.warn(
                "litellm_settings.cache_params: " + ", ".join(ignored) + " not imported "
                "(Tollgate caches in its own Redis, or in process)"
            )
        if params.get("ttl") is None:
            self.warn(
                f"litellm_settings.cache: no ttl; routes cache answers for "
                f"{CACHE_DEFAULT_TTL_SECONDS} s"
            )
            return CACHE_DEFAULT_TTL_SECONDS
        return self.whole(params["ttl"], "litellm_settings.cache_params.ttl", 1)

    def report_unread(self) -> None:
        """One warning per setting Tollgate does not carry over, naming where it was."""
        for (section, key), where in self.unread.items():
            hint = f"not imported: {_HINTS[key]}" if key in _HINTS else "not imported"
            if section.startswith("model_list"):
                entries = ", ".join(dict.fromkeys(where))
                self.warn(f"{section}.{key} ({entries}): {hint}")
            else:
                self.warn(f"{section}.{key}: {hint}")


def _address_words(base_url: str, kind: str) -> str:
    """What tells one address of a kind from another: a variable's distinctive words, or
    the host's first label."""
    reference = re.fullmatch(r"\$\{([A-Za-z0-9_]+)\}", base_url)
    if reference:
        noise = {*kind.split("_"), "api", "base", "url", "endpoint"}
        words = [w for w in reference.group(1).lower().split("_") if w and w not in noise]
        return "-".join(words) or reference.group(1).lower()
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if re.fullmatch(r"[0-9.]+|[0-9a-f:]+", host):  # an address, not a name: keep it whole
        return "-".join(filter(None, [host.replace(":", "-"), str(parts.port or "")]))
    return host.split(".")[0]
