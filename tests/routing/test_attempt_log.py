"""Every upstream attempt of a request, and (for orgs that ask) its bodies, reach the ledger.

Through a running gateway and the mock provider; with Redis the records travel the
usage stream to a Celery worker first, so the new fields are proven to round-trip.
"""

import httpx
import pytest
from openai import OpenAI

from billing.models import UsageEvent, UsageEventBody
from routing.models import Deployment, Provider, Route
from routing.proxy.metering import BodyCapture, _logged_text
from tenants.models import Organization
from tests.conftest import IssueKey
from tests.support.gateway import GatewayServer, wait_for_events, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def route_over(mock_url: str):
    """Route `model` over deployments given as (name, upstream model), in priority order."""

    def build(model: str, *deployments: tuple[str, str], **route_fields: object) -> Route:
        provider = Provider.objects.create(name="mock", kind=Provider.Kind.MOCK, base_url=mock_url)
        route = Route.objects.create(model_name=model, **route_fields)
        for priority, (name, upstream) in enumerate(deployments):
            route.deployments.add(
                Deployment.objects.create(
                    provider=provider, name=name, upstream_model=upstream, priority=priority
                )
            )
        return route

    return build


def chat(gateway: GatewayServer, key: str, model: str, **body: object) -> httpx.Response:
    return httpx.post(
        f"{gateway.v1}/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": model, "messages": HELLO, **body},
        timeout=15,
    )


def only_event(org: Organization, model: str) -> UsageEvent:
    (event,) = wait_for_events(UsageEvent.objects.filter(org=org, model=model), 1)
    return event


def test_a_failover_logs_the_failed_attempt_then_the_one_that_answered(
    gateway: GatewayServer, org, route_over, live_key: IssueKey
) -> None:
    deployments = route_over("fo", ("primary", "fo-p+fault=500"), ("backup", "fo-b"))
    assert chat(gateway, live_key(org), "fo").status_code == 200
    event = only_event(org, "fo")
    failed, answered = event.attempt_log
    ids = dict(Deployment.objects.filter(routes=deployments).values_list("name", "pk"))
    assert (failed["deployment_id"], failed["deployment_name"], failed["provider_kind"]) == (
        ids["primary"], "primary", "mock",
    )  # fmt: skip
    assert (failed["outcome"], failed["status_code"]) == ("upstream_error", 502)
    assert failed["error_class"] and failed["ttfb_ms"] is None
    assert (answered["deployment_name"], answered["outcome"], answered["status_code"]) == (
        "backup", "success", 200,
    )  # fmt: skip
    assert answered["error_class"] == ""
    assert answered["started_ms"] >= failed["started_ms"] + failed["duration_ms"]
    assert event.attempts == len(event.attempt_log) == 2
    assert failed["duration_ms"] + answered["duration_ms"] <= event.latency_ms


def test_a_request_every_deployment_fails_logs_every_attempt(
    gateway: GatewayServer, org, route_over, live_key: IssueKey
) -> None:
    route_over("down", ("one", "down-1+fault=503"), ("two", "down-2+fault=500"), max_attempts=2)
    response = chat(gateway, live_key(org), "down")
    assert response.status_code >= 500
    event = only_event(org, "down")
    assert [a["deployment_name"] for a in event.attempt_log] == ["one", "two"]
    assert {a["outcome"] for a in event.attempt_log} == {"upstream_error"}
    assert event.attempts == 2 and event.outcome == "upstream_error"
    assert event.attempt_log[-1]["status_code"] == event.status_code


def test_a_streamed_answer_logs_its_time_to_first_byte(
    gateway: GatewayServer, org, route_over, live_key: IssueKey
) -> None:
    route_over("st", ("only", "st"))
    sdk = OpenAI(base_url=gateway.v1, api_key=live_key(org), max_retries=0)
    assert "".join(
        c.choices[0].delta.content or ""
        for c in sdk.chat.completions.create(model="st", messages=HELLO, stream=True)
        if c.choices
    )
    (attempt,) = only_event(org, "st").attempt_log
    assert attempt["outcome"] == "success" and attempt["ttfb_ms"] is not None
    assert 0 <= attempt["ttfb_ms"] <= attempt["duration_ms"]


def test_a_request_refused_before_routing_has_no_attempts(
    gateway: GatewayServer, org, live_key: IssueKey
) -> None:
    assert chat(gateway, live_key(org), "no-such-model").status_code == 404
    event = only_event(org, "no-such-model")
    assert event.attempt_log == [] and event.attempts == 0


def test_without_body_logging_no_body_is_kept(
    gateway: GatewayServer, org, route_over, live_key: IssueKey
) -> None:
    route_over("quiet", ("only", "quiet"))
    assert chat(gateway, live_key(org), "quiet").status_code == 200
    event = only_event(org, "quiet")
    assert not UsageEventBody.objects.filter(event=event).exists()


def test_with_body_logging_the_bodies_are_kept_without_the_key(
    gateway: GatewayServer, org, route_over, live_key: IssueKey
) -> None:
    org.log_request_bodies = True
    org.save()
    route_over("loud", ("only", "loud"))
    key = live_key(org)  # accepted once the snapshot has the org's new setting
    leaked = [{"role": "user", "content": f"my key is {key}, keep it safe"}]
    response = chat(gateway, key, "loud", messages=leaked)
    assert response.status_code == 200
    event = only_event(org, "loud")
    body = UsageEventBody.objects.get(event=event)
    assert body.org_id == org.pk and body.started_at == event.started_at
    assert "my key is [redacted key], keep it safe" in body.request_body
    assert key not in body.request_body and key not in body.response_body
    assert "authorization" not in body.request_body.lower()
    assert body.response_body == response.text  # the complete answer, as the client got it
    assert not body.request_truncated and not body.response_truncated


def test_a_streamed_response_is_kept_as_the_events_relayed(
    gateway: GatewayServer, org, route_over, live_key: IssueKey
) -> None:
    org.log_request_bodies = True
    org.save()
    route_over("loud-stream", ("only", "loud-stream"))
    key = live_key(org)
    with httpx.stream(
        "POST", f"{gateway.v1}/chat/completions", headers={"authorization": f"Bearer {key}"},
        json={"model": "loud-stream", "messages": HELLO, "stream": True}, timeout=15,
    ) as response:  # fmt: skip
        relayed = b"".join(response.iter_bytes()).decode()
    event = only_event(org, "loud-stream")
    body = wait_until(lambda: UsageEventBody.objects.filter(event=event).first(), what="the body")
    assert body.response_body.startswith("data: ")
    assert body.response_body == relayed
    assert '"stream": true' in body.request_body or '"stream":true' in body.request_body


def test_a_failed_request_keeps_the_error_it_answered_with(
    gateway: GatewayServer, org, live_key: IssueKey
) -> None:
    org.log_request_bodies = True
    org.save()
    response = chat(gateway, live_key(org), "missing-model")
    assert response.status_code == 404
    event = only_event(org, "missing-model")
    body = wait_until(lambda: UsageEventBody.objects.filter(event=event).first(), what="the body")
    assert "model_not_found" in body.response_body


# ------------------------------------------------------------------ capping, in process


def test_a_capture_keeps_the_first_bytes_and_says_it_was_cut() -> None:
    capture = BodyCapture(10)
    for chunk in (b"data: 1\n", b"data: 2\n", b"data: 3\n"):
        capture.add(chunk)
    assert capture.value() == b"data: 1\nda" and capture.truncated
    capture.replace(b"short")
    assert capture.value() == b"short" and not capture.truncated


def test_logged_text_redacts_the_key_before_cutting_and_survives_bad_bytes() -> None:
    secret = b"tgk_secretsecretsecret"
    # The key straddles the cap: it must not be stored even in part.
    raw = b"x" * 8 + secret + b"tail"
    text, truncated = _logged_text(raw, secret=secret, max_bytes=12)
    assert text == "xxxxxxxx[red" and truncated
    assert "secret" not in text and "tgk_" not in text
    text, truncated = _logged_text("é\x00".encode() + b"\xff", secret=None, max_bytes=100)
    assert text == "é\ufffd\ufffd" and not truncated
    text, truncated = _logged_text("é".encode(), secret=None, max_bytes=1)  # cut inside é
    assert text == "\ufffd" and truncated
