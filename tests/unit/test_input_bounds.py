"""Input is bounded at the edge to what the proxy can store and compute with (issue 10,
"zero 5xx from input"): every place an outside audit got a 500 from, as an exact 400 that
names the field, and the parsers behind them held to their bounds for any input
(hypothesis, marked ``fuzz``)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from robota_client.messages import MAX_MODEL_LENGTH, MAX_TOKENS
from robota_proxy.app import create_app
from robota_proxy.chat_body import MAX_JSON_DEPTH, parse_chat_request, parse_json
from robota_proxy.errors import InvalidRequest
from robota_proxy.policy.keys import MAX_EXPIRY, expiry_in, parse_expiry
from robota_proxy.policy.pricing import to_pico
from robota_proxy.policy.principals import MAX_BUDGET_USD, MAX_COUNT, UserPermissions
from robota_proxy.routes.usage_report import FIRST_DAY, LAST_DAY, parse_day
from robota_proxy.settings import Settings
from robota_proxy.streams.buffer import parse_event_id, parse_seq

ADMIN = "admin-key-for-bounds-0123456789"
USER = "user-key-for-bounds-0123456789"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
AS_USER = {"Authorization": f"Bearer {USER}"}
STREAM = "s_" + "0" * 32
INT64_MAX = 2**63 - 1
CHAT = {"provider": "mock", "model": "mock-1", "messages": [{"role": "user", "content": "hi"}]}


#: The apps below live for the whole module (in TestClient's thread), also while the parser
#: tests of its end run for seconds: their lease reclaimer does one round at start and no
#: more, so mutation testing does not take those tests for tests of reclaiming (a round in
#: the background during a test counts as that test reaching the code) and run them for
#: every mutant of it. Nothing here is about leases.
NO_RECLAIM_ROUNDS = 3600.0


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    # A database of its own: the autouse ROBOTA_DATABASE_URL of conftest is set per test, after
    # this module's fixture is built, so the default would be ./robota.db, shared by every run
    # in that directory (mutation testing runs two at once in mutants/).
    database = tmp_path_factory.mktemp("bounds") / "robota.db"
    app = create_app(
        Settings(
            api_keys=[USER],
            admin_key=ADMIN,
            cache_enabled=False,
            database_url=f"sqlite:///{database}",
            lease_reclaim_seconds=NO_RECLAIM_ROUNDS,
        )
    )
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def pg_client(postgres_url: str) -> Iterator[TestClient]:
    """On PostgreSQL, which refuses NUL in text: where a name nobody can have was a 5xx."""
    settings = Settings(
        api_keys=[USER],
        admin_key=ADMIN,
        cache_enabled=False,
        database_url=postgres_url,
        lease_reclaim_seconds=NO_RECLAIM_ROUNDS,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def assert_400(answer: Any, *words: str) -> None:
    """The wire's invalid_request error, its message naming the field."""
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["requestId"] == answer.headers["x-request-id"]
    for word in words:
        assert word in error["message"], error["message"]


# --- the audit's places, one by one ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "field"),
    [({"to": "9999-12-31"}, "'to'"), ({"from": "1969-12-31", "to": "1970-01-02"}, "'from'")],
)
def test_a_report_day_out_of_range_is_a_400(
    client: TestClient, query: dict[str, str], field: str
) -> None:
    assert_400(client.get("/ai/usage", params=query, headers=AS_USER), field, "9999-12-30")


def test_the_last_reportable_day_is_answered(client: TestClient) -> None:
    answer = client.get(
        "/ai/usage", params={"from": "9999-12-01", "to": "9999-12-30"}, headers=AS_USER
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["to"] == "9999-12-30"


@pytest.mark.parametrize("last", ["²", f"{STREAM}:²", f"{STREAM}:¹²"])
def test_a_unicode_digit_in_last_event_id_is_a_400(client: TestClient, last: str) -> None:
    headers = {**AS_USER, "Last-Event-ID": last.encode("latin-1")}
    answer = client.get(f"/ai/chat/stream/{STREAM}", headers=headers)  # type: ignore[arg-type]
    assert_400(answer, "Last-Event-ID")


@pytest.mark.parametrize("max_tokens", [10**15, 2**63, 10**19, MAX_TOKENS + 1])
def test_max_tokens_past_the_bound_is_a_400(client: TestClient, max_tokens: int) -> None:
    body = {**CHAT, "options": {"maxTokens": max_tokens}}
    assert_400(client.post("/ai/chat", json=body, headers=AS_USER), "maxTokens", str(MAX_TOKENS))


@pytest.mark.parametrize(
    ("permissions", "field"),
    [
        ({"monthlyTokenLimit": 10**15 + 1}, "monthlyTokenLimit"),
        ({"monthlyTokenLimit": 2**63}, "monthlyTokenLimit"),
        ({"rpm": 10**30}, "rpm"),
        ({"monthlyBudgetUsd": "1e30"}, "monthlyBudgetUsd"),
        ({"monthlyBudgetUsd": 1e30}, "monthlyBudgetUsd"),
        ({"monthlyBudgetUsd": "1000000.000000000001"}, "monthlyBudgetUsd"),
        ({"allowedModels": ["gpt\u0000"]}, "allowedModels"),
    ],
)
def test_a_permission_past_what_storage_holds_is_a_400(
    client: TestClient, permissions: dict[str, Any], field: str
) -> None:
    assert_400(client.put("/admin/users/ada", json=permissions, headers=AS_ADMIN), field)
    body = {"user": "ada", "permissions": permissions}
    assert_400(client.post("/admin/keys", json=body, headers=AS_ADMIN), field)


@pytest.mark.parametrize(
    ("expiry", "field"),
    [
        ({"expiresIn": 10**12}, "expiresIn"),
        ({"expiresIn": "999999999d"}, "expiresIn"),
        ({"expiresIn": "9" * 5000 + "d"}, "expiresIn"),
        ({"expiresAt": "9999-12-31T23:00:00-05:00"}, "expiresAt"),
        ({"expiresAt": "2200-01-01"}, "expiresAt"),
    ],
)
def test_an_expiry_past_the_bound_is_a_400(
    client: TestClient, expiry: dict[str, Any], field: str
) -> None:
    answer = client.post("/admin/keys", json={"user": "ada", **expiry}, headers=AS_ADMIN)
    assert_400(answer, field, "too far in the future")


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"user": "\\ud800"}', ("not valid JSON", "surrogate")),
        (b'{"user": "ada", "name": "\\udfff"}', ("not valid JSON", "surrogate")),
        (b'{"user": "a\\u0000b"}', ("user", "control characters")),
        (b'{"user": "ada", "name": "a\\u0000"}', ("name",)),
        (b'{"user": "ada", "permissions": ' + b"[" * 1000 + b"]" * 1000 + b"}", ("nested",)),
    ],
)
def test_admin_bodies_that_cannot_be_stored_are_a_400(
    client: TestClient, body: bytes, words: tuple[str, ...]
) -> None:
    answer = client.post("/admin/keys", content=body, headers=AS_ADMIN)
    assert_400(answer, *words)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"a":' * 1000 + b"1" + b"}" * 1000, ("nested deeper than 200",)),
        (
            b'{"provider": "mock", "model": "mock-1", "messages": [{"role": "user", '
            b'"content": "hi", "metadata": ' + b"[" * 1000 + b"]" * 1000 + b"}]}",
            ("nested",),
        ),
        (b'{"provider": "mock", "model": "\\ud800", "messages": []}', ("surrogate",)),
    ],
)
def test_chat_bodies_too_deep_or_with_lone_surrogates_are_a_400(
    client: TestClient, body: bytes, words: tuple[str, ...]
) -> None:
    assert_400(client.post("/ai/chat", content=body, headers=AS_USER), *words)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"model": "m" * (MAX_MODEL_LENGTH + 1)}, "model"),
        ({"model": "mock\u0000"}, "model"),
        ({"provider": "p" * 101}, "provider"),
        ({"provider": "mo\nck"}, "provider"),
    ],
)
def test_names_longer_than_the_ledger_column_or_with_control_characters_are_a_400(
    client: TestClient, changes: dict[str, str], field: str
) -> None:
    assert_400(client.post("/ai/chat", json={**CHAT, **changes}, headers=AS_USER), field)


@pytest.mark.parametrize("path", ["/admin/keys?user=a%00", "/admin/usage?user=%00%0e"])
def test_a_user_filter_with_nul_is_a_400_not_a_database_error(
    pg_client: TestClient, path: str
) -> None:
    # Found by the schemathesis run on PostgreSQL, which refused it with a 503.
    assert_400(pg_client.get(path, headers=AS_ADMIN), "user", "control characters")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/users/a%00"),
        ("DELETE", "/admin/users/a%00"),
        ("POST", "/admin/users/a%00/restore"),
        ("GET", "/admin/keys/%00"),
        ("DELETE", "/admin/keys/" + "k" * 65),
    ],
)
def test_a_lookup_of_a_name_nothing_can_have_is_a_404(
    pg_client: TestClient, method: str, path: str
) -> None:
    answer = pg_client.request(method, path, headers=AS_ADMIN)
    assert answer.status_code == 404, answer.text
    assert answer.json()["error"]["code"] == "not_found"


def test_a_budget_is_answered_as_a_plain_decimal_in_whole_picodollars(client: TestClient) -> None:
    answer = client.put("/admin/users/ada", json={"monthlyBudgetUsd": "1E+5"}, headers=AS_ADMIN)
    assert answer.status_code == 200, answer.text
    assert answer.json()["permissions"] == {"monthlyBudgetUsd": "100000"}
    tiny = client.put("/admin/users/ada", json={"monthlyBudgetUsd": "1e-999"}, headers=AS_ADMIN)
    assert tiny.json()["permissions"] == {"monthlyBudgetUsd": "0.000000000001"}


# --- the parsers, for any input (hypothesis) ------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None)


@pytest.mark.fuzz
@FUZZ
@given(st.text(max_size=60) | st.from_regex(r"\A\s*s_[0-9a-f]{32}:\w{1,10}\s*\Z"))
def test_event_ids_parse_to_ascii_digits_or_nothing(value: str) -> None:
    parsed = parse_event_id(value)
    seq = parse_seq(value)
    for number in (parsed[1] if parsed else None, seq):
        assert number is None or 0 <= number < 10**9
    if parsed is not None:
        assert value.strip() == f"{parsed[0]}:{value.strip().rpartition(':')[2]}"
        assert value.strip().rpartition(":")[2].isascii()


@pytest.mark.fuzz
@FUZZ
@given(st.text(max_size=20) | st.dates().map(date.isoformat))
def test_report_days_are_in_range_or_a_400(text: str) -> None:
    try:
        day = parse_day("to", text)
    except InvalidRequest as exc:
        assert "'to'" in exc.message
    else:
        assert FIRST_DAY <= day <= LAST_DAY
        datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1)  # no overflow


NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.fuzz
@FUZZ
@given(
    st.text(max_size=30)
    | st.from_regex(r"\A\s*[0-9]{1,30}\s*[dhm]\s*\Z")
    | st.datetimes(timezones=st.timezones()).map(datetime.isoformat)
)
def test_expiries_are_within_the_bound_or_a_value_error(text: str) -> None:
    try:
        when = parse_expiry(text, now=NOW)
    except ValueError as exc:
        assert str(exc).startswith("expiry ")
    else:
        assert NOW < when <= NOW + MAX_EXPIRY


@pytest.mark.fuzz
@FUZZ
@given(st.integers())
def test_expiry_seconds_are_within_the_bound_or_a_value_error(seconds: int) -> None:
    try:
        when = expiry_in(seconds, now=NOW)
    except ValueError:
        assert seconds <= 0 or seconds > MAX_EXPIRY.total_seconds()
    else:
        assert NOW < when <= NOW + MAX_EXPIRY


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.decimals().map(str)
    | st.text(max_size=10)
)
permission_values = json_scalars | st.lists(json_scalars | st.text(max_size=10), max_size=3)
permission_names = st.sampled_from(
    [
        "allowedProviders",
        "allowedModels",
        "allowedFeatures",
        "rpm",
        "tpm",
        "dailyRequestLimit",
        "monthlyTokenLimit",
        "monthlyBudgetUsd",
    ]
)


@pytest.mark.fuzz
@FUZZ
@given(st.dictionaries(permission_names, permission_values, max_size=4))
def test_permissions_fit_the_int64_counters_or_are_a_400(data: dict[str, Any]) -> None:
    try:
        permissions = UserPermissions.from_wire(data)
    except InvalidRequest:
        return
    for count in (
        permissions.rpm,
        permissions.tpm,
        permissions.daily_requests,
        permissions.monthly_tokens,
    ):
        assert count is None or 0 <= count <= MAX_COUNT
    budget = permissions.monthly_budget_usd
    if budget is not None:
        assert Decimal(0) <= budget <= MAX_BUDGET_USD
        # Room for used + reserved + a call's worst case in int64 picodollars.
        assert 8 * to_pico(budget) < INT64_MAX
    wire = permissions.to_wire()
    assert UserPermissions.from_wire(wire) == permissions
    assert "E" not in wire.get("monthlyBudgetUsd", "")
    for names in (permissions.allowed_models, permissions.allowed_providers):
        for name in names or ():
            name.encode()  # storable


@pytest.mark.fuzz
@FUZZ
@given(
    st.binary(max_size=300)
    | st.builds(lambda depth: b"[" * depth + b"]" * depth, st.integers(0, 3000))
    | st.builds(
        lambda model, tokens: (
            b'{"provider": "mock", "model": "%s", "options": {"maxTokens": %d}, '
            b'"messages": [{"role": "user", "content": "x"}]}' % (model, tokens)
        ),
        st.text(max_size=250).map(lambda t: t.replace("\\", "").replace('"', "").encode()),
        st.integers(min_value=1),
    )
)
def test_chat_bodies_parse_within_the_bounds_or_are_a_400(body: bytes) -> None:
    try:
        request = parse_chat_request(body)
    except InvalidRequest as exc:
        assert exc.message
        return
    assert 1 <= len(request.model) <= MAX_MODEL_LENGTH
    request.model.encode()
    assert all(ord(char) >= 0x20 and char != "\x7f" for char in request.model)
    assert request.options.max_tokens is None or request.options.max_tokens <= MAX_TOKENS


@pytest.mark.fuzz
@FUZZ
@given(st.integers(0, 5000), st.sampled_from(["[", '{"a":']))
def test_json_is_parsed_to_the_depth_bound_and_refused_past_it(depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    text = opener * depth + "1" + closer * depth
    try:
        parse_json(text)
    except InvalidRequest as exc:
        assert depth > MAX_JSON_DEPTH
        assert "nested" in exc.message
    else:
        assert depth <= MAX_JSON_DEPTH
