"""Reading a callback, without a server: the three shapes, status precedence,
authentication against the token's lease, body limits and error text."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from lqjobs.callback import tokens
from lqjobs.callback.parsing import (
    MAX_ERROR_CHARS,
    CallbackRequest,
    Rejected,
    Report,
    authenticate,
    error_text,
    parse_report,
    token_of,
)
from lqjobs.lease import Lease
from lqjobs.settings import Settings

KEYS = tokens.CallbackKeys.parse("k1:" + "s" * 32)
LEASE = Lease(42, "bridge-host-0001", 3, datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC))


def rejected(status: int, call: Callable[..., object], *args: object) -> None:
    with pytest.raises(Rejected) as caught:
        call(*args)
    assert caught.value.status == status


def body(value: object) -> bytes:
    return json.dumps(value).encode()


# -- the three shapes -------------------------------------------------------------------


def test_neutral_shape() -> None:
    headers = {"x-job-id": "42", "x-worker-id": LEASE.worker_id}
    assert parse_report(headers, body({"status": "success"})) == Report(True)
    assert parse_report(headers, body({"status": "error", "error": "disk full"})) == Report(
        False, "disk full"
    )
    assert parse_report(headers, body({"status": "error"})) == Report(False, "function failed")


def test_legacy_shape_is_any_post_with_a_job_id() -> None:
    assert parse_report({"x-job-id": "42"}, b"") == Report(True)
    assert parse_report({"x-job-id": "42"}, body({"anything": 1})) == Report(True)
    failed = parse_report({"x-job-id": "42", "x-job-error": "true"}, body({"message": "boom"}))
    assert failed == Report(False, "boom")
    assert parse_report({"x-job-id": "42", "x-job-error": "false"}, b"") == Report(True)


def test_queue_worker_shape_uses_the_function_status() -> None:
    relayed = {"x-function-status": "200", "x-call-id": "c", "x-function-name": "f"}
    assert parse_report(relayed, b"any text at all") == Report(True)
    failed = parse_report({**relayed, "x-function-status": "500"}, body({"message": "oops"}))
    assert failed == Report(False, "function failed with status 500: oops")
    text = parse_report({**relayed, "x-function-status": "502"}, b"upstream\nbroken")
    assert text == Report(False, "function failed with status 502: upstream broken")


@pytest.mark.parametrize(
    ("status", "retry_on_404", "permanent"),
    [
        ("400", True, True),
        ("401", True, True),
        ("403", True, True),
        ("410", True, True),
        ("422", True, True),
        ("404", True, False),
        ("404", False, True),
        ("408", True, False),
        ("429", True, False),
        ("500", True, False),
        ("503", True, False),
    ],
)
def test_a_relayed_status_is_permanent_exactly_where_a_synchronous_call_s_is(
    status: str, retry_on_404: bool, permanent: bool
) -> None:
    relayed = {"x-function-status": status, "x-call-id": "c"}
    report = parse_report(relayed, b"", retry_on_404=retry_on_404)
    assert not report.success and report.final
    assert report.permanent is permanent
    # the neutral and legacy shapes carry no status: the function asked for a retry
    assert parse_report({}, body({"status": "error", "error": "e"})).permanent is False


def test_header_less_503_of_an_unreachable_function_is_a_failure() -> None:
    report = parse_report({"x-function-status": "503", "x-call-id": "c"}, b"")
    assert report == Report(False, "function failed with status 503")


def test_an_intermediate_retry_is_not_final_but_the_last_one_is() -> None:
    relayed = {"x-function-status": "429", "x-retry-max": "10"}
    assert parse_report({**relayed, "x-retry": "3"}, b"").final is False
    assert parse_report({**relayed, "x-retry": "10"}, b"").final is True
    assert parse_report({**relayed, "x-function-status": "200", "x-retry": "3"}, b"").success


# -- precedence: a relayed reply by its status, any other by its body ------------------------


@pytest.mark.parametrize(
    ("headers", "payload", "success"),
    [
        # relayed: the status (and X-Job-Error) decide, as for a synchronous call
        ({"x-job-error": "true", "x-function-status": "500"}, {"status": "success"}, False),
        ({"x-function-status": "500"}, {"status": "success"}, False),
        ({"x-function-status": "200"}, {"status": "error", "error": "e"}, True),
        ({"x-job-error": "true", "x-function-status": "200"}, {"message": "m"}, False),
        ({"x-job-error": "TRUE", "x-function-status": "200"}, {}, False),
        ({"x-job-error": "false", "x-function-status": "503"}, {}, False),
        ({"x-function-status": "204", "x-job-id": "42"}, {"status": "ok"}, True),
        # posted by the function itself: the body's status, then X-Job-Error
        ({"x-job-id": "42"}, {"status": "error", "error": "e"}, False),
        ({"x-job-id": "42", "x-job-error": "true"}, {"status": "success"}, True),
        ({"x-job-id": "42", "x-job-error": "true"}, {}, False),
    ],
)
def test_status_precedence(headers: dict[str, str], payload: object, success: bool) -> None:
    assert parse_report(headers, body(payload)).success is success


def test_a_relayed_failure_keeps_the_status_message_whatever_the_body_claims() -> None:
    report = parse_report({"x-function-status": "500"}, body({"status": "success"}))
    assert report == Report(False, "function failed with status 500")


# -- malformed callbacks -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "raw"),
    [
        ({"x-job-id": "42"}, b"{not json"),
        ({"x-job-id": "42"}, b"[1, 2]"),
        ({"x-job-id": "42"}, b"\xff\xfe"),
        ({"x-job-id": "42"}, b"[" * 50_000),
        ({"x-job-id": "42"}, body({"status": "done"})),
        ({}, body({"note": "no outcome at all"})),
        ({}, b""),
        ({"x-function-status": "fine"}, b""),
        ({"x-function-status": "2000"}, b""),
    ],
)
def test_malformed_callbacks_are_400(headers: dict[str, str], raw: bytes) -> None:
    rejected(400, parse_report, headers, raw)


def test_a_relayed_body_is_the_function_s_own_and_never_malformed() -> None:
    relayed = {"x-function-status": "200"}
    for raw in (b"{not json", b"[1]", body({"status": "done"}), b"\xff"):
        assert parse_report(relayed, raw) == Report(True)


# -- error text ---------------------------------------------------------------------------


def test_error_text_strips_control_characters_and_is_cut_to_4_kib() -> None:
    dirty = "line1\nline2\r\x1b[31mred\x00nul\x7fdel\x85nel\u2028sep"
    cleaned = error_text(dirty)
    assert cleaned == "line1 line2  [31mred nul del nel sep"
    assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in cleaned)
    assert len(error_text("x" * 100_000)) == MAX_ERROR_CHARS


def test_a_failure_message_in_the_body_is_cleaned() -> None:
    report = parse_report(
        {"x-job-id": "42"}, body({"status": "error", "error": "a\r\nInjected: yes" + "z" * 9000})
    )
    assert report.message.startswith("a  Injected: yes")
    assert "\n" not in report.message and len(report.message) == MAX_ERROR_CHARS


# -- authentication (no database) -----------------------------------------------------------


def request(query: str, **headers: str) -> CallbackRequest:
    return CallbackRequest(query, {k.replace("_", "-"): v for k, v in headers.items()}, b"")


def test_a_genuine_token_with_matching_headers_authenticates() -> None:
    token = tokens.sign(KEYS, LEASE, timedelta(minutes=10))
    query = tokens.callback_url("http://cb:12345/callback", token).split("?", 1)[1]
    claims = authenticate(KEYS, request(query, x_job_id="42", x_worker_id=LEASE.worker_id))
    assert claims.lease == LEASE
    assert authenticate(KEYS, request(query)).lease == LEASE  # headers are optional


@pytest.mark.parametrize(
    ("mutate", "headers", "status"),
    [
        (lambda t: "", {}, 401),
        (lambda t: t[:-2] + ("A" if t[-2] != "A" else "B") + t[-1], {}, 401),
        (lambda t: t.replace("v1.k1.", "v1.k2."), {}, 401),
        (lambda t: t, {"x_job_id": "43"}, 401),
        (lambda t: t, {"x_worker_id": "bridge-other-0002"}, 401),
        (lambda t: t, {"x_job_id": "42abc"}, 400),
    ],
)
def test_forged_or_foreign_callbacks_are_refused(
    mutate: Callable[[str], str], headers: dict[str, str], status: int
) -> None:
    token = mutate(tokens.sign(KEYS, LEASE, timedelta(minutes=10)))
    rejected(status, authenticate, KEYS, request(f"token={token}", **headers))


def test_token_query_must_hold_exactly_one_token() -> None:
    assert token_of("a=1&token=abc") == "abc"
    for query in ("", "token=", "token=a&token=b", "tok=abc", "&".join(["a=1"] * 20)):
        rejected(401, token_of, query)


# -- settings ---------------------------------------------------------------------------------


def test_callback_deadline_defaults_below_the_lock_expiry() -> None:
    assert Settings().callback_deadline_seconds() == 300
    assert (
        Settings(
            job_expiry=60,
            max_queue_wait=5,
            visibility_timeout=61,
            task_time_limit=50,
            task_soft_time_limit=40,
            http_timeout=30,
        ).callback_deadline_seconds()
        == 30
    )
    assert Settings().callback_host == "0.0.0.0"


def test_a_deadline_past_the_lock_expiry_violates_the_ladder() -> None:
    problems = Settings(callback_deadline=600).timeout_ladder_problems()
    assert any("LQJOBS_CALLBACK_DEADLINE" in problem for problem in problems)
    assert Settings(callback_deadline=30).timeout_ladder_problems() == []
