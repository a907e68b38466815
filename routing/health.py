"""Per-deployment health for the routing engine: circuit breakers, decayed latency, in-flight.

One `DeploymentHealth` lives in each web process and is used from its event loop only (it
is not thread-safe and does no I/O). Every method that depends on time takes `now`, the
caller's `time.monotonic()`, so tests drive the clock.

A breaker per deployment:

- **closed** admits everything. It opens when `consecutive_failures` calls in a row failed,
  or when the sliding window (`window_s`) holds at least `min_requests` calls of which a
  share of at least `error_rate` failed. The window counts this process's calls plus the
  fleet-wide counts of the other replicas last applied by `merge_window`.
- **open** refuses until `cooldown_s` has passed; the next `allow` then turns it
  **half-open** and admits exactly one probe. The probe's success closes the breaker (and
  starts a fresh window); its failure reopens it with a fresh cooldown. A probe that never
  reports back (cancelled, crashed) is considered lost after `cooldown_s`, and the next
  `allow` admits another, so a breaker cannot stay wedged half-open.

Usage per deployment over the last minute (requests sent, tokens used, plus the tokens
reserved by calls still in flight) lets the router keep each deployment under its own
RPM/TPM limits and lets usage-aware routes prefer the one with the most headroom.

Sharing between replicas (`routing/health_sync.py`) is layered on top through
`take_changes`, `merge_shared`, `merge_window` and `merge_usage`; without it each
process's state is complete on its own (the embedded default).
"""

import enum
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# Local sliding window resolution: `window_s` is split into this many buckets, so memory per
# deployment is bounded whatever the traffic (60 buckets = per-second for the default 60 s).
WINDOW_BUCKETS = 60
# Providers' rate limits are per minute; usage is counted in one-second buckets.
USAGE_WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """Thresholds of the circuit breakers and of the latency averages (seconds, shares)."""

    consecutive_failures: int = 5
    error_rate: float = 0.5
    window_s: float = 60.0
    min_requests: int = 10
    cooldown_s: float = 30.0
    latency_half_life_s: float = 60.0

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1 or self.min_requests < 1:
            raise ValueError("consecutive_failures and min_requests must be at least 1")
        if not 0.0 < self.error_rate <= 1.0:
            raise ValueError("error_rate must be in (0, 1]")
        if self.window_s <= 0 or self.cooldown_s <= 0 or self.latency_half_life_s <= 0:
            raise ValueError("window_s, cooldown_s and latency_half_life_s must be positive")


class CircuitState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class DeploymentStatus:
    """A snapshot of one deployment's health, for the dashboard and the management API.

    `window_requests`/`window_failures` are the counts the breaker judges the error rate on:
    this process's window plus the other replicas' counts from the last sync.
    `minute_requests`/`minute_tokens` is the deployment's usage over the last minute, the
    fleet's included, with tokens reserved by calls in flight. `opened_at` is on the
    process's monotonic clock; `retry_in_s` is the cooldown left while open.
    """

    deployment_id: int
    state: CircuitState
    consecutive_failures: int
    window_requests: int
    window_failures: int
    latency_ms: float | None
    ttft_ms: float | None
    in_flight: int
    opened_at: float | None
    retry_in_s: float | None = None
    minute_requests: int = 0
    minute_tokens: int = 0


@dataclass(frozen=True, slots=True)
class HealthChanges:
    """What this process learned since the last `take_changes`, for publishing to replicas.

    `opened`: deployment id -> monotonic time its cooldown ends, for breakers this process
    opened and that are still open. `closed`: breakers this process closed after a
    successful probe. `window`: deployment id -> (requests, failures) recorded since.
    `usage`: deployment id -> (requests sent, tokens used) since.
    """

    opened: Mapping[int, float]
    closed: frozenset[int]
    window: Mapping[int, tuple[int, int]]
    usage: Mapping[int, tuple[int, int]] = field(default_factory=dict)


@dataclass(slots=True)
class _Decayed:
    """Time-decayed average: each sample's weight halves every half-life.

    A weighted sum rather than a per-sample EWMA, so a burst of samples at the same instant
    still moves the average (a per-sample factor would be zero for zero elapsed time).
    """

    total: float = 0.0
    weight: float = 0.0
    at: float = 0.0

    def add(self, value: float, now: float, half_life_s: float) -> None:
        if self.weight:
            factor = 0.5 ** (max(0.0, now - self.at) / half_life_s)
            self.total *= factor
            self.weight *= factor
        self.total += value
        self.weight += 1.0
        self.at = now

    @property
    def value(self) -> float | None:
        return self.total / self.weight if self.weight > 0.0 else None


@dataclass(slots=True)
class _MinuteUsage:
    """Requests and tokens of the last minute, in one-second buckets."""

    # [second, requests, tokens], oldest first; totals kept alongside.
    buckets: deque[list[int]] = field(default_factory=deque)
    requests: int = 0
    tokens: int = 0
    reserved_tokens: int = 0  # estimates of the calls in flight, until they report
    remote_requests: int = 0
    remote_tokens: int = 0
    remote_at: float | None = None
    unsynced_requests: int = 0
    unsynced_tokens: int = 0

    def add(self, now: float, *, requests: int = 0, tokens: int = 0) -> None:
        second = self._prune(now)
        if not self.buckets or self.buckets[-1][0] < second:
            self.buckets.append([second, 0, 0])
        bucket = self.buckets[-1]
        bucket[1] += requests
        bucket[2] += tokens
        self.requests += requests
        self.tokens += tokens
        self.unsynced_requests += requests
        self.unsynced_tokens += tokens

    def totals(self, now: float) -> tuple[int, int]:
        """(requests, tokens) of the last minute: fleet-wide, reservations included."""
        self._prune(now)
        requests, tokens = self.requests, self.tokens + self.reserved_tokens
        if self.remote_at is not None and now - self.remote_at <= USAGE_WINDOW_S:
            requests += self.remote_requests
            tokens += self.remote_tokens
        return requests, max(0, tokens)

    def _prune(self, now: float) -> int:
        second = math.floor(now)
        oldest = second - int(USAGE_WINDOW_S) + 1
        while self.buckets and self.buckets[0][0] < oldest:
            _, requests, tokens = self.buckets.popleft()
            self.requests -= requests
            self.tokens -= tokens
        return second


@dataclass(slots=True)
class _Circuit:
    state: CircuitState = CircuitState.CLOSED
    consecutive_failures: int = 0
    opened_at: float | None = None
    retry_at: float = 0.0
    probe_started_at: float | None = None
    # [bucket index, requests, failures], oldest first; totals kept alongside.
    buckets: deque[list[int]] = field(default_factory=deque)
    window_requests: int = 0
    window_failures: int = 0
    remote_requests: int = 0
    remote_failures: int = 0
    remote_at: float | None = None
    unsynced_requests: int = 0
    unsynced_failures: int = 0
    latency: _Decayed = field(default_factory=_Decayed)
    ttft: _Decayed = field(default_factory=_Decayed)
    in_flight: int = 0
    usage: _MinuteUsage = field(default_factory=_MinuteUsage)


class DeploymentHealth:
    """Circuit breakers, decayed latency/TTFT and in-flight counts of every deployment."""

    def __init__(self, policy: BreakerPolicy | None = None) -> None:
        self.policy = policy or BreakerPolicy()
        self._circuits: dict[int, _Circuit] = {}
        # Transitions made by this process since the last take_changes (last one wins).
        self._changes: dict[int, CircuitState] = {}
        self._bucket_s = self.policy.window_s / WINDOW_BUCKETS

    # -- the request path ------------------------------------------------------------------

    def allow(self, deployment_id: int, now: float) -> bool:
        """Whether a call may go to the deployment now; admitting a half-open probe reserves it.

        Call it only for the deployment actually about to be called, and report the outcome
        with `record_success`/`record_failure`.
        """
        circuit = self._circuits.get(deployment_id)
        if circuit is None or circuit.state is CircuitState.CLOSED:
            return True
        if circuit.state is CircuitState.OPEN:
            if now < circuit.retry_at:
                return False
            circuit.state = CircuitState.HALF_OPEN
            circuit.probe_started_at = now
            return True
        # Half-open: one probe at a time; a probe silent for a whole cooldown is lost.
        started = circuit.probe_started_at
        if started is not None and now - started < self.policy.cooldown_s:
            return False
        circuit.probe_started_at = now
        return True

    def record_success(
        self, deployment_id: int, now: float, *, latency_ms: float, ttft_ms: float | None = None
    ) -> None:
        """Count a successful call; a half-open probe's success closes the breaker."""
        circuit = self._circuit(deployment_id)
        self._count(circuit, now, failed=False)
        circuit.consecutive_failures = 0
        half_life = self.policy.latency_half_life_s
        circuit.latency.add(latency_ms, now, half_life)
        if ttft_ms is not None:
            circuit.ttft.add(ttft_ms, now, half_life)
        if circuit.state is CircuitState.HALF_OPEN:
            self._close(circuit)
            self._changes[deployment_id] = CircuitState.CLOSED

    def record_failure(self, deployment_id: int, now: float) -> None:
        """Count a failed call; opens the breaker past a threshold, reopens a failed probe."""
        circuit = self._circuit(deployment_id)
        self._count(circuit, now, failed=True)
        circuit.consecutive_failures += 1
        if circuit.state is CircuitState.HALF_OPEN or (
            circuit.state is CircuitState.CLOSED
            and (
                circuit.consecutive_failures >= self.policy.consecutive_failures
                or self._error_rate_exceeded(circuit, now)
            )
        ):
            self._open(deployment_id, circuit, now)

    def started(self, deployment_id: int, now: float, *, reserved_tokens: int = 0) -> None:
        """A call to the deployment begins: one more in flight, one more request this minute.

        `reserved_tokens` (the request's estimate) counts against the deployment's tokens
        per minute until `finished` releases it and `record_tokens` reports the real count.
        """
        circuit = self._circuit(deployment_id)
        circuit.in_flight += 1
        circuit.usage.add(now, requests=1)
        circuit.usage.reserved_tokens += max(0, reserved_tokens)

    def finished(self, deployment_id: int, *, reserved_tokens: int = 0) -> None:
        """One call fewer in flight; never below zero, so an unmatched call is harmless."""
        circuit = self._circuits.get(deployment_id)
        if circuit is not None and circuit.in_flight > 0:
            circuit.in_flight -= 1
            usage = circuit.usage
            usage.reserved_tokens = max(0, usage.reserved_tokens - max(0, reserved_tokens))

    def record_tokens(self, deployment_id: int, tokens: int, now: float) -> None:
        """Tokens a finished call used, towards the deployment's tokens per minute."""
        if tokens > 0:
            self._circuit(deployment_id).usage.add(now, tokens=tokens)

    # -- reads -----------------------------------------------------------------------------

    def latency_ms(self, deployment_id: int, now: float | None = None) -> float | None:
        """Decayed average latency of successful calls, or None without data.

        Given `now`, a measurement older than two half-lives counts as no data:
        a deployment that lost its lead long ago gets measured again instead of
        being judged forever on old numbers.
        """
        circuit = self._circuits.get(deployment_id)
        if circuit is None:
            return None
        stale_after_s = 2 * self.policy.latency_half_life_s
        if now is not None and circuit.latency.weight and now - circuit.latency.at > stale_after_s:
            return None
        return circuit.latency.value

    def ttft_ms(self, deployment_id: int) -> float | None:
        """Decayed average time to first token of successful calls, or None without data."""
        circuit = self._circuits.get(deployment_id)
        return circuit.ttft.value if circuit is not None else None

    def minute_usage(self, deployment_id: int, now: float) -> tuple[int, int]:
        """(requests, tokens) sent to the deployment over the last minute, fleet-wide."""
        circuit = self._circuits.get(deployment_id)
        return circuit.usage.totals(now) if circuit is not None else (0, 0)

    def in_flight(self, deployment_id: int) -> int:
        """Calls to the deployment currently in flight from this process."""
        circuit = self._circuits.get(deployment_id)
        return circuit.in_flight if circuit is not None else 0

    def status(self, deployment_id: int, now: float) -> DeploymentStatus:
        """A snapshot of the deployment's health; an unknown id is closed with no data."""
        circuit = self._circuits.get(deployment_id)
        if circuit is None:
            return DeploymentStatus(
                deployment_id, CircuitState.CLOSED, 0, 0, 0, None, None, 0, None
            )
        requests, failures = self._window_counts(circuit, now)
        minute_requests, minute_tokens = circuit.usage.totals(now)
        open_ = circuit.state is CircuitState.OPEN
        return DeploymentStatus(
            deployment_id=deployment_id,
            state=circuit.state,
            consecutive_failures=circuit.consecutive_failures,
            window_requests=requests,
            window_failures=failures,
            latency_ms=circuit.latency.value,
            ttft_ms=circuit.ttft.value,
            in_flight=circuit.in_flight,
            opened_at=circuit.opened_at,
            retry_in_s=max(0.0, circuit.retry_at - now) if open_ else None,
            minute_requests=minute_requests,
            minute_tokens=minute_tokens,
        )

    def statuses(self, now: float) -> list[DeploymentStatus]:
        """Snapshots of every deployment this process has seen, by id."""
        return [self.status(deployment_id, now) for deployment_id in sorted(self._circuits)]

    def deployment_ids(self) -> list[int]:
        """Ids of the deployments this process has state for."""
        return list(self._circuits)

    # -- sharing with other replicas -------------------------------------------------------

    def take_changes(self) -> HealthChanges:
        """Hand over the transitions and window counts since the last call, and reset them."""
        opened: dict[int, float] = {}
        closed: set[int] = set()
        for deployment_id, state in self._changes.items():
            circuit = self._circuits[deployment_id]
            if state is CircuitState.OPEN and circuit.state is CircuitState.OPEN:
                opened[deployment_id] = circuit.retry_at
            elif state is CircuitState.CLOSED and circuit.state is CircuitState.CLOSED:
                closed.add(deployment_id)
        self._changes.clear()
        window: dict[int, tuple[int, int]] = {}
        usage: dict[int, tuple[int, int]] = {}
        for deployment_id, circuit in self._circuits.items():
            if circuit.unsynced_requests:
                window[deployment_id] = (circuit.unsynced_requests, circuit.unsynced_failures)
                circuit.unsynced_requests = circuit.unsynced_failures = 0
            minute = circuit.usage
            if minute.unsynced_requests or minute.unsynced_tokens:
                usage[deployment_id] = (minute.unsynced_requests, minute.unsynced_tokens)
                minute.unsynced_requests = minute.unsynced_tokens = 0
        return HealthChanges(opened=opened, closed=frozenset(closed), window=window, usage=usage)

    def merge_shared(
        self, opened: Mapping[int, float], now: float, *, closed: Iterable[int] = ()
    ) -> None:
        """Adopt other replicas' breakers: `opened` maps id -> seconds of cooldown left.

        An open shared breaker wins over a local closed one and extends a local open one's
        cooldown; a local half-open probe goes on undisturbed. `closed` lists breakers a
        replica closed after a successful probe: a local open breaker closes too. A
        transition this process made since the last `take_changes` is newer than what was
        read from Redis, so it is kept.
        """
        cooldown_s = self.policy.cooldown_s
        for deployment_id, left_s in opened.items():
            if left_s <= 0 or self._changes.get(deployment_id) is CircuitState.CLOSED:
                continue
            left_s = min(left_s, cooldown_s)
            circuit = self._circuit(deployment_id)
            if circuit.state is CircuitState.CLOSED:
                circuit.state = CircuitState.OPEN
                circuit.opened_at = now - (cooldown_s - left_s)
                circuit.retry_at = now + left_s
                circuit.probe_started_at = None
            elif circuit.state is CircuitState.OPEN:
                circuit.retry_at = max(circuit.retry_at, now + left_s)
        for deployment_id in closed:
            circuit = self._circuits.get(deployment_id)
            if (
                circuit is not None
                and circuit.state is not CircuitState.CLOSED
                and self._changes.get(deployment_id) is not CircuitState.OPEN
            ):
                self._close(circuit)

    def merge_window(self, counts: Mapping[int, tuple[int, int]], now: float) -> None:
        """Replace the other replicas' window counts (id -> (requests, failures)) and judge.

        A closed breaker whose combined window crosses the error-rate threshold opens, so an
        error rate split across replicas still trips it. Ids missing from `counts` have no
        remote traffic. Remote counts older than `window_s` (syncs stopped) are ignored.
        """
        for deployment_id, circuit in self._circuits.items():
            if deployment_id not in counts:
                circuit.remote_requests = circuit.remote_failures = 0
                circuit.remote_at = None
        for deployment_id, (requests, failures) in counts.items():
            if requests <= 0 and deployment_id not in self._circuits:
                continue
            circuit = self._circuit(deployment_id)
            circuit.remote_requests = max(0, requests)
            circuit.remote_failures = min(max(0, failures), circuit.remote_requests)
            circuit.remote_at = now
            if circuit.state is CircuitState.CLOSED and self._error_rate_exceeded(circuit, now):
                self._open(deployment_id, circuit, now)

    def merge_usage(self, counts: Mapping[int, tuple[int, int]], now: float) -> None:
        """Replace the other replicas' last-minute usage: id -> (requests, tokens)."""
        for deployment_id, circuit in self._circuits.items():
            if deployment_id not in counts:
                circuit.usage.remote_requests = circuit.usage.remote_tokens = 0
                circuit.usage.remote_at = None
        for deployment_id, (requests, tokens) in counts.items():
            usage = self._circuit(deployment_id).usage
            usage.remote_requests, usage.remote_tokens = max(0, requests), max(0, tokens)
            usage.remote_at = now

    # -- internals -------------------------------------------------------------------------

    def _circuit(self, deployment_id: int) -> _Circuit:
        circuit = self._circuits.get(deployment_id)
        if circuit is None:
            circuit = self._circuits[deployment_id] = _Circuit()
        return circuit

    def _open(self, deployment_id: int, circuit: _Circuit, now: float) -> None:
        circuit.state = CircuitState.OPEN
        circuit.opened_at = now
        circuit.retry_at = now + self.policy.cooldown_s
        circuit.probe_started_at = None
        self._changes[deployment_id] = CircuitState.OPEN

    def _close(self, circuit: _Circuit) -> None:
        # A recovered deployment starts a fresh window: the failures that opened the breaker
        # must not reopen it on the first new failure.
        circuit.state = CircuitState.CLOSED
        circuit.opened_at = None
        circuit.probe_started_at = None
        circuit.consecutive_failures = 0
        circuit.buckets.clear()
        circuit.window_requests = circuit.window_failures = 0
        circuit.remote_requests = circuit.remote_failures = 0
        circuit.remote_at = None
        circuit.unsynced_requests = circuit.unsynced_failures = 0

    def _prune(self, circuit: _Circuit, now: float) -> int:
        """Drop buckets that left the window; return the current bucket index."""
        index = math.floor(now / self._bucket_s)
        oldest = index - WINDOW_BUCKETS + 1
        buckets = circuit.buckets
        while buckets and buckets[0][0] < oldest:
            _, requests, failures = buckets.popleft()
            circuit.window_requests -= requests
            circuit.window_failures -= failures
        return index

    def _count(self, circuit: _Circuit, now: float, *, failed: bool) -> None:
        index = self._prune(circuit, now)
        buckets = circuit.buckets
        # A clock that went backwards (caller bug) lands in the newest bucket.
        if not buckets or buckets[-1][0] < index:
            buckets.append([index, 0, 0])
        bucket = buckets[-1]
        bucket[1] += 1
        circuit.window_requests += 1
        circuit.unsynced_requests += 1
        if failed:
            bucket[2] += 1
            circuit.window_failures += 1
            circuit.unsynced_failures += 1

    def _window_counts(self, circuit: _Circuit, now: float) -> tuple[int, int]:
        self._prune(circuit, now)
        requests, failures = circuit.window_requests, circuit.window_failures
        if circuit.remote_at is not None and now - circuit.remote_at <= self.policy.window_s:
            requests += circuit.remote_requests
            failures += circuit.remote_failures
        return requests, failures

    def _error_rate_exceeded(self, circuit: _Circuit, now: float) -> bool:
        requests, failures = self._window_counts(circuit, now)
        return requests >= self.policy.min_requests and (
            failures >= self.policy.error_rate * requests
        )
