"""The OpenAPI document: committed copy in sync, valid 3.1, complete, and true to the app.

"True" is checked against real answers: each call below is made against the app and its
status must be documented for that operation, with a body that validates against the
documented schema. The request schemas are checked the other way round: a body the schema
accepts the proxy accepts, and a body the schema refuses the proxy refuses.
"""

from __future__ import annotations

import json
import re
from itertools import product
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient

from robota_client.messages import UniversalMessage
from robota_proxy import create_app, mount
from robota_proxy.dialects import dialect_of_path
from robota_proxy.openapi import openapi_document, openapi_json
from robota_proxy.settings import Settings

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
USER = "user-key-for-openapi-0123456789"
ADMIN = "admin-key-for-openapi-0123456789"
AS_USER = {"Authorization": f"Bearer {USER}"}
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
CHAT = {"provider": "mock", "model": "mock-1", "messages": [{"role": "user", "content": "hi"}]}
DOC = openapi_document()


def settings() -> Settings:
    return Settings(api_keys=[USER], admin_key=ADMIN, cache_enabled=False)


def schema_validator(schema: dict[str, Any]) -> Draft202012Validator:
    """A validator for ``schema`` whose ``#/components/...`` references resolve in DOC."""
    root = {**schema, "components": DOC["components"]}
    return Draft202012Validator(root, format_checker=Draft202012Validator.FORMAT_CHECKER)


def component(name: str) -> Draft202012Validator:
    return schema_validator({"$ref": f"#/components/schemas/{name}"})


def resolve(item: dict[str, Any]) -> dict[str, Any]:
    ref = item.get("$ref")
    if ref is None:
        return item
    target: Any = DOC
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    return {**target, **{k: v for k, v in item.items() if k != "$ref"}}


def check(response: httpx.Response, template: str, method: str) -> None:
    """The answer's status is documented for the operation and its body fits the schema."""
    operation = DOC["paths"][template][method]
    documented = operation["responses"]
    status = str(response.status_code)
    assert status in documented, f"{method.upper()} {template} answered undocumented {status}"
    content = resolve(documented[status])["content"]
    media = response.headers["content-type"].split(";")[0]
    assert media in content, f"{method.upper()} {template} {status}: {media} not documented"
    if media == "application/json":
        component_validator = schema_validator(content[media]["schema"])
        component_validator.validate(response.json())
    else:
        events = content[media]["x-sse-events"]
        for event_id, name, data in sse_events(response.text):
            assert re.fullmatch(r"s_[0-9a-f]{32}:\d+", event_id)
            schema_validator(events[name]).validate(json.loads(data))


def sse_events(text: str) -> list[tuple[str, str, str]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["id"], fields["event"], fields["data"]))
    return events


# --- the document itself -----------------------------------------------------------------------


def test_committed_document_is_the_generated_one() -> None:
    assert COMMITTED.read_text() == openapi_json(), (
        "docs/openapi.json is stale: python -m robota_proxy.openapi > docs/openapi.json"
    )


def test_document_is_valid_openapi_3_1() -> None:
    assert DOC["openapi"] == "3.1.0"
    validate(DOC)


def test_every_route_of_the_app_is_documented_and_nothing_else() -> None:
    routed: set[tuple[str, str]] = set()
    for route in create_app(settings()).routes:
        if isinstance(route, WebSocketRoute):
            routed.add((route.path, "get"))
        else:
            assert isinstance(route, Route) and route.methods is not None
            routed |= {(route.path, m.lower()) for m in route.methods if m != "HEAD"}
    documented = {
        (path, method)
        for path, item in DOC["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert documented == routed


#: The prefix of the error responses of each dialect (``/v1/*`` answers in the vendor's).
ERROR_PREFIX = {"robota": "", "openai": "OpenAI", "anthropic": "Anthropic"}


def test_every_operation_has_an_id_and_every_error_status_its_dialects_error_body() -> None:
    ids = []
    for path, item in DOC["paths"].items():
        prefix = ERROR_PREFIX[dialect_of_path(path).name]
        for method, operation in item.items():
            if method == "parameters":
                continue
            ids.append(operation["operationId"])
            for status, response in operation["responses"].items():
                # /ready's 503 is its answer (not ready, and why), not an error of the request.
                if (path, status) == ("/ready", "503"):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Readiness"}
                    continue
                if int(status) >= 400:
                    assert response["$ref"] == f"#/components/responses/{prefix}Error{status}"
    assert len(ids) == len(set(ids))


def test_compatible_surfaces_document_bodies_streams_errors_and_keys() -> None:
    paths = DOC["paths"]
    chat = paths["/v1/chat/completions"]["post"]
    messages = paths["/v1/messages"]["post"]
    for operation in (chat, messages):
        assert set(operation["responses"]["200"]["content"]) == {
            "application/json",
            "text/event-stream",
        }
        assert {"400", "401", "402", "403", "404", "413", "429", "502", "503", "504"} <= set(
            operation["responses"]
        )
    schemas = DOC["components"]["schemas"]
    assert schemas["OpenAIChatRequest"]["required"] == ["model", "messages"]
    assert schemas["OpenAIChatRequest"]["additionalProperties"] is True
    assert schemas["AnthropicMessagesRequest"]["required"] == ["model", "messages", "max_tokens"]
    assert schemas["AnthropicMessagesRequest"]["additionalProperties"] is True
    assert schemas["OpenAIEmbeddingRequest"]["additionalProperties"] is False
    assert DOC["components"]["securitySchemes"]["anthropicApiKey"] == {
        "type": "apiKey",
        "in": "header",
        "name": "x-api-key",
        "description": DOC["components"]["securitySchemes"]["anthropicApiKey"]["description"],
    }
    assert messages["security"] == [{"bearer": []}, {"anthropicApiKey": []}]
    assert "security" not in chat  # the document's default: bearer


def test_bounds_of_the_models_are_in_the_schemas() -> None:
    options = DOC["components"]["schemas"]["ChatOptions"]["properties"]
    assert {"maximum": 2, "minimum": 0, "type": "number"} in options["temperature"]["anyOf"]
    max_tokens = {"exclusiveMinimum": 0, "maximum": 10_000_000, "type": "integer"}
    assert max_tokens in options["maxTokens"]["anyOf"]
    request = DOC["components"]["schemas"]["ChatRequest"]
    assert request["properties"]["messages"]["minItems"] == 1
    assert request["required"] == ["provider", "model", "messages"]


def test_stream_and_resume_are_event_streams_with_last_event_id() -> None:
    stream = DOC["paths"]["/ai/chat/stream"]["post"]["responses"]["200"]["content"]
    assert set(stream["text/event-stream"]["x-sse-events"]) == {
        "delta",
        "tool_call",
        "usage",
        "done",
        "error",
        "restart",
    }
    resume = DOC["paths"]["/ai/chat/stream/{stream_id}"]["get"]
    header = next(p for p in resume["parameters"] if p["in"] == "header")
    assert header["name"] == "Last-Event-ID" and header["required"] is False


# --- served ----------------------------------------------------------------------------------


def test_served_without_credentials() -> None:
    with TestClient(create_app(settings())) as client:
        answer = client.get("/openapi.json")
    assert answer.status_code == 200
    assert answer.json() == DOC


def test_mounted_it_names_the_mount_point_as_server() -> None:
    host = Starlette()
    mount(host, "/llm", create_app(settings()))
    with TestClient(host) as client:
        answer = client.get("/llm/openapi.json")
    assert answer.status_code == 200
    assert answer.json() == {**DOC, "servers": [{"url": "/llm"}]}


# --- true to the app -----------------------------------------------------------------------------


def test_answers_of_every_route_fit_the_document() -> None:
    with TestClient(create_app(settings())) as client:
        check(client.get("/health"), "/health", "get")
        check(client.get("/openapi.json"), "/openapi.json", "get")
        check(client.get("/ai/models", headers=AS_USER), "/ai/models", "get")
        check(client.get("/ai/models"), "/ai/models", "get")  # 401
        check(client.post("/ai/chat", json=CHAT, headers=AS_USER), "/ai/chat", "post")
        check(
            client.post("/ai/chat", json={"provider": "mock"}, headers=AS_USER), "/ai/chat", "post"
        )
        stream = client.post("/ai/chat/stream", json=CHAT, headers=AS_USER)
        assert stream.status_code == 200
        check(stream, "/ai/chat/stream", "post")
        stream_id = stream.headers["x-robota-stream-id"]
        first = sse_events(stream.text)[0][0]
        resume = f"/ai/chat/stream/{stream_id}"
        resumed = client.get(resume, headers={**AS_USER, "Last-Event-ID": first})
        assert resumed.status_code == 200 and resumed.text
        check(resumed, "/ai/chat/stream/{stream_id}", "get")
        bad_position = client.get(resume, headers={**AS_USER, "Last-Event-ID": "x"})
        assert bad_position.status_code == 400
        check(bad_position, "/ai/chat/stream/{stream_id}", "get")
        check(
            client.get("/ai/chat/stream/s_nope", headers=AS_USER),
            "/ai/chat/stream/{stream_id}",
            "get",
        )
        check(client.get("/ai/ws", headers=AS_USER), "/ai/ws", "get")  # no upgrade: 404
        check(client.get("/ai/me", headers=AS_USER), "/ai/me", "get")
        check(client.get("/ai/usage", headers=AS_USER), "/ai/usage", "get")
        check(client.get("/ai/usage?from=2025-02-30", headers=AS_USER), "/ai/usage", "get")

        body = {
            "user": "ada",
            "name": "laptop",
            "expiresIn": "30d",
            "permissions": {"rpm": 5, "allowedFeatures": ["chat"], "monthlyBudgetUsd": "1.5"},
        }
        component("CreateKeyRequest").validate(body)
        created = client.post("/admin/keys", json=body, headers=AS_ADMIN)
        assert created.status_code == 201
        check(created, "/admin/keys", "post")
        key_id = created.json()["id"]
        check(client.get("/admin/keys", headers=AS_ADMIN), "/admin/keys", "get")
        check(client.get("/admin/keys"), "/admin/keys", "get")  # 401
        check(client.get(f"/admin/keys/{key_id}", headers=AS_ADMIN), "/admin/keys/{key_id}", "get")
        check(client.get("/admin/keys/nope", headers=AS_ADMIN), "/admin/keys/{key_id}", "get")
        revoked = client.delete(f"/admin/keys/{key_id}", headers=AS_ADMIN)
        assert revoked.json()["status"] == "revoked"
        check(revoked, "/admin/keys/{key_id}", "delete")
        user = {"permissions": {"allowedModels": ["mock-*"], "tpm": 1000}}
        check(
            client.put("/admin/users/ada", json=user, headers=AS_ADMIN),
            "/admin/users/{user}",
            "put",
        )
        check(client.get("/admin/users/ada", headers=AS_ADMIN), "/admin/users/{user}", "get")
        revoked_user = client.delete("/admin/users/ada", headers=AS_ADMIN)
        assert revoked_user.status_code == 200 and revoked_user.json()["revokedAt"] is not None
        check(revoked_user, "/admin/users/{user}", "delete")
        check(
            client.delete("/admin/users/nobody", headers=AS_ADMIN), "/admin/users/{user}", "delete"
        )
        restore = "/admin/users/{user}/restore"
        restored = client.post("/admin/users/ada/restore", headers=AS_ADMIN)
        assert restored.status_code == 200 and restored.json()["revokedAt"] is None
        check(restored, restore, "post")
        check(client.post("/admin/users/nobody/restore", headers=AS_ADMIN), restore, "post")
        check(client.get("/admin/usage", headers=AS_ADMIN), "/admin/usage", "get")
        check(client.get("/admin/metrics", headers=AS_ADMIN), "/admin/metrics", "get")


def vendor_sse(text: str) -> list[tuple[str, Any]]:
    """``(event name, data)`` of each frame; ``message`` when it has no ``event:`` (OpenAI's
    frames), and OpenAI's closing ``[DONE]`` left out."""
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        if fields["data"] != "[DONE]":
            events.append((fields.get("event", "message"), json.loads(fields["data"])))
    return events


def check_vendor(response: httpx.Response, template: str, method: str = "post") -> None:
    """``check`` for a ``/v1`` operation: JSON, or the vendor's own event stream."""
    media = response.headers["content-type"].split(";")[0]
    if media != "text/event-stream":
        check(response, template, method)
        return
    operation = DOC["paths"][template][method]
    assert response.status_code == 200
    events = operation["responses"]["200"]["content"][media]["x-sse-events"]
    seen = vendor_sse(response.text)
    assert seen
    for name, data in seen:
        assert name in events, f"{template}: undocumented event {name}"
        schema_validator(events[name]).validate(data)


OPENAI_CHAT = {"model": "mock/mock-1", "messages": [{"role": "user", "content": "hi"}]}
ANTHROPIC_CHAT = {**OPENAI_CHAT, "max_tokens": 64}
AS_ANTHROPIC = {"x-api-key": USER}


def test_answers_of_the_compatible_surfaces_fit_the_document() -> None:
    chat, messages = "/v1/chat/completions", "/v1/messages"
    count, embeddings = "/v1/messages/count_tokens", "/v1/embeddings"
    with TestClient(create_app(settings())) as client:
        check_vendor(client.get("/v1/models", headers=AS_USER), "/v1/models", "get")
        check_vendor(client.get("/v1/models"), "/v1/models", "get")  # 401
        check_vendor(client.post(chat, json=OPENAI_CHAT, headers=AS_USER), chat)
        streamed = {**OPENAI_CHAT, "stream": True, "stream_options": {"include_usage": True}}
        check_vendor(client.post(chat, json=streamed, headers=AS_USER), chat)
        check_vendor(client.post(chat, json={"model": "mock/mock-1"}, headers=AS_USER), chat)
        check_vendor(client.post(chat, json=OPENAI_CHAT), chat)  # 401
        check_vendor(client.post(chat, content=b"x" * (5 << 20), headers=AS_USER), chat)  # 413
        # The mock has no embeddings: a 400 naming the model.
        body = {"model": "mock/mock-1", "input": "hi"}
        component("OpenAIEmbeddingRequest").validate(body)
        check_vendor(client.post(embeddings, json=body, headers=AS_USER), embeddings)
        check_vendor(client.post(embeddings, json={**body, "x": 1}, headers=AS_USER), embeddings)
        check_vendor(client.post(messages, json=ANTHROPIC_CHAT, headers=AS_ANTHROPIC), messages)
        check_vendor(client.post(messages, json=ANTHROPIC_CHAT, headers=AS_USER), messages)
        streamed = {**ANTHROPIC_CHAT, "stream": True}
        check_vendor(client.post(messages, json=streamed, headers=AS_ANTHROPIC), messages)
        check_vendor(client.post(messages, json=OPENAI_CHAT, headers=AS_ANTHROPIC), messages)
        check_vendor(client.post(messages, json=ANTHROPIC_CHAT), messages)  # 401
        check_vendor(client.post(count, json=OPENAI_CHAT, headers=AS_ANTHROPIC), count)
        check_vendor(client.post(count, json={"model": "m"}, headers=AS_ANTHROPIC), count)


@pytest.mark.parametrize(
    ("path", "schema", "body"),
    [
        ("/v1/chat/completions", "OpenAIChatRequest", {"model": "mock/mock-1"}),
        ("/v1/chat/completions", "OpenAIChatRequest", {**OPENAI_CHAT, "messages": []}),
        ("/v1/chat/completions", "OpenAIChatRequest", {**OPENAI_CHAT, "model": ""}),
        ("/v1/chat/completions", "OpenAIChatRequest", {**OPENAI_CHAT, "temperature": 3}),
        ("/v1/chat/completions", "OpenAIChatRequest", {**OPENAI_CHAT, "max_tokens": 0}),
        ("/v1/chat/completions", "OpenAIChatRequest", {**OPENAI_CHAT, "stream": "yes"}),
        (
            "/v1/chat/completions",
            "OpenAIChatRequest",
            {**OPENAI_CHAT, "messages": [{"role": "robot", "content": "hi"}]},
        ),
        ("/v1/messages", "AnthropicMessagesRequest", OPENAI_CHAT),
        ("/v1/messages", "AnthropicMessagesRequest", {**ANTHROPIC_CHAT, "max_tokens": 0}),
        ("/v1/messages", "AnthropicMessagesRequest", {**ANTHROPIC_CHAT, "temperature": 1.5}),
        (
            "/v1/messages",
            "AnthropicMessagesRequest",
            {**ANTHROPIC_CHAT, "messages": [{"role": "system", "content": "hi"}]},
        ),
        ("/v1/messages/count_tokens", "AnthropicCountTokensRequest", {"model": "mock/mock-1"}),
        ("/v1/embeddings", "OpenAIEmbeddingRequest", {"model": "mock/mock-1"}),
        ("/v1/embeddings", "OpenAIEmbeddingRequest", {"model": "m", "input": []}),
        ("/v1/embeddings", "OpenAIEmbeddingRequest", {"model": "m", "input": "a", "dimensions": 0}),
        ("/v1/embeddings", "OpenAIEmbeddingRequest", {"model": "m", "input": "a", "bogus": 1}),
    ],
)
def test_a_vendor_body_the_schema_refuses_the_proxy_refuses(
    path: str, schema: str, body: dict[str, Any]
) -> None:
    assert not component(schema).is_valid(body)
    with TestClient(create_app(settings())) as client:
        answer = client.post(path, json=body, headers=AS_USER)
    assert answer.status_code == 400, answer.text
    check_vendor(answer, path)


@pytest.mark.parametrize(
    ("path", "schema", "body"),
    [
        ("/v1/chat/completions", "OpenAIChatRequest", OPENAI_CHAT),
        (
            "/v1/chat/completions",
            "OpenAIChatRequest",
            {**OPENAI_CHAT, "temperature": 2, "max_completion_tokens": 5, "stop": ["x"]},
        ),
        ("/v1/messages", "AnthropicMessagesRequest", ANTHROPIC_CHAT),
        (
            "/v1/messages",
            "AnthropicMessagesRequest",
            {**ANTHROPIC_CHAT, "system": "be brief", "temperature": 1, "stop_sequences": ["x"]},
        ),
        ("/v1/messages/count_tokens", "AnthropicCountTokensRequest", OPENAI_CHAT),
    ],
)
def test_a_vendor_body_for_the_mock_the_schema_accepts_the_proxy_accepts(
    path: str, schema: str, body: dict[str, Any]
) -> None:
    assert component(schema).is_valid(body)
    with TestClient(create_app(settings())) as client:
        answer = client.post(path, json=body, headers=AS_USER)
    assert answer.status_code == 200, answer.text
    check_vendor(answer, path)


def test_admin_api_disabled_is_documented() -> None:
    with TestClient(create_app(Settings(api_keys=[USER]))) as client:
        check(client.get("/admin/metrics", headers=AS_ADMIN), "/admin/metrics", "get")


# --- request schemas agree with the proxy -------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"user": "ada"},
        {"user": "   "},
        {"user": "a" * 201},
        {"user": "ada", "bogus": 1},
        {"user": "ada", "expiresIn": 3600},
        {"user": "ada", "expiresIn": 0},
        {"user": "ada", "expiresIn": "12h"},
        {"user": "ada", "expiresIn": "0d"},
        {"user": "ada", "expiresAt": "2999-01-01", "expiresIn": "1d"},
        {"user": "ada", "name": "x" * 200},
        {"user": "ada", "name": "x" * 201},
        {"user": "ada", "permissions": {"rpm": -1}},
        {"user": "ada", "permissions": {"allowedFeatures": ["fly"]}},
        {"user": "ada", "permissions": {"allowedModels": "gpt-*,claude-*"}},
        {"user": "ada", "permissions": {"monthlyBudgetUsd": "2.50", "tpm": None}},
        {"user": "ada", "permissions": {"unknown": 1}},
        {"permissions": {}},
    ],
)
def test_create_key_schema_accepts_what_the_proxy_accepts(body: dict[str, Any]) -> None:
    with TestClient(create_app(settings())) as client:
        answer = client.post("/admin/keys", json=body, headers=AS_ADMIN)
    assert answer.status_code in (201, 400)
    assert component("CreateKeyRequest").is_valid(body) == (answer.status_code == 201)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"permissions": {"rpm": 10}},
        {"permissions": None},
        {"rpm": 10, "allowedProviders": ["mock"]},
        {"rpm": "10"},
        {"allowedFeatures": "chat,stream"},
        {"allowedFeatures": "chat,fly"},
        {"monthlyBudgetUsd": -1},
        {"monthlyBudgetUsd": "-1"},
        {"monthlyBudgetUsd": "1.25"},
        {"monthlyBudgetUsd": 0},
        {"allowedFeatures": " chat , ,tools"},
        {"permissions": {"bogus": True}},
    ],
)
def test_set_user_schema_accepts_what_the_proxy_accepts(body: dict[str, Any]) -> None:
    with TestClient(create_app(settings())) as client:
        answer = client.put("/admin/users/ada", json=body, headers=AS_ADMIN)
    assert answer.status_code in (200, 400)
    assert component("SetUserRequest").is_valid(body) == (answer.status_code == 200)


@pytest.mark.parametrize(
    "expiry", [{"expiresIn": "9999999999d"}, {"expiresIn": 10**20}, {"expiresIn": 10**12}]
)
def test_an_expiry_the_schema_allows_past_year_9999_is_a_400_not_a_500(
    expiry: dict[str, Any],
) -> None:
    body = {"user": "ada", **expiry}
    assert component("CreateKeyRequest").is_valid(body)
    with TestClient(create_app(settings())) as client:
        answer = client.post("/admin/keys", json=body, headers=AS_ADMIN)
    assert answer.status_code == 400
    assert answer.json()["error"]["message"].endswith("too far in the future")


def _message_cases() -> list[dict[str, Any]]:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    absent = object()
    cases = []
    for role, content, call_id, calls in product(
        ("system", "user", "assistant", "tool"),
        (absent, None, "", "text"),
        (absent, "", "c1"),
        (absent, [], [call]),
    ):
        message: dict[str, Any] = {"role": role}
        for name, value in (("content", content), ("toolCallId", call_id), ("toolCalls", calls)):
            if value is not absent:
                message[name] = value
        cases.append(message)
    return cases


def test_message_rules_in_the_schema_are_the_validators() -> None:
    schema = component("UniversalMessage")
    disagreements = []
    for message in _message_cases():
        try:
            UniversalMessage.model_validate(message)
            accepted = True
        except ValidationError:
            accepted = False
        if schema.is_valid(message) != accepted:
            disagreements.append((message, accepted))
    assert disagreements == []
