"""Embeddings, one piece at a time: the OpenAI adapter's wire mapping against a scripted
server on a socket (``vendor_stub``), the Gemini adapter against the fake Gemini on a real
socket, the fakes against the official ``openai`` SDK and plain httpx (so they are known to
speak the real wire), and the ``/v1/embeddings`` body parser."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest

from robota_client.messages import Usage
from robota_proxy.dialects import openai_embeddings, syntactic_router
from robota_proxy.errors import Forbidden, InvalidRequest, NotFound, RateLimited, UpstreamError
from robota_proxy.policy.principals import UserPermissions
from robota_proxy.routes.embeddings import answer, base64_floats, estimated_usage
from robota_proxy.testing import FakeVendors, Fault, Reply
from robota_proxy.testing.embeddings import base64_vector, fake_vector
from robota_proxy.upstreams.base import Embedder, EmbeddingRequest, EmbeddingResult
from robota_proxy.upstreams.google import GoogleUpstream
from robota_proxy.upstreams.openai import OpenAIUpstream
from tests.unit.vendor_stub import VendorStub, vendor_stub

pytestmark = pytest.mark.anyio

KEY = "sk-test-embeddings-key-0123456789abcdef"
PATH = "/v1/embeddings"
OPENAI_MODEL = "text-embedding-3-small"
GEMINI_MODEL = "gemini-embedding-001"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def server() -> Iterator[FakeVendors]:
    with FakeVendors(api_key=KEY) as running:
        yield running


@pytest.fixture
def fake(server: FakeVendors) -> Iterator[FakeVendors]:
    server.reset()
    yield server
    server.reset()


# --- the OpenAI adapter (a scripted server) ---------------------------------------------------


api = pytest.fixture(vendor_stub)


@pytest.fixture
async def openai_upstream(api: VendorStub) -> AsyncIterator[OpenAIUpstream]:
    adapter = OpenAIUpstream(api_key=KEY, base_url=f"{api.url}/v1")
    yield adapter
    await adapter.aclose()


def listed(*vectors: Any, prompt_tokens: int | None = 7, model: str = OPENAI_MODEL) -> Any:
    answer: dict[str, Any] = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": vector}
            for index, vector in enumerate(vectors)
        ],
        "model": model,
    }
    if prompt_tokens is not None:
        answer["usage"] = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return answer


async def test_adapters_are_embedders_and_the_mock_is_not(
    openai_upstream: OpenAIUpstream, google: GoogleUpstream
) -> None:
    """What the route checks before a call: Anthropic (no embeddings API) and the mock do
    not implement ``embed`` (both checked at class level: no pools opened for it)."""
    from robota_proxy.upstreams.anthropic import AnthropicUpstream
    from robota_proxy.upstreams.mock import MockUpstream

    assert isinstance(openai_upstream, Embedder)
    assert isinstance(google, Embedder)
    assert not hasattr(AnthropicUpstream, "embed")
    assert not hasattr(MockUpstream, "embed")


async def test_openai_one_text_is_sent_bare_with_every_field(
    openai_upstream: OpenAIUpstream, api: VendorStub
) -> None:
    route = api.post(PATH).respond(json=listed([0.5, -0.25], prompt_tokens=3))
    result = await openai_upstream.embed(
        EmbeddingRequest("openai", OPENAI_MODEL, ("hello world",), dimensions=2, user="u-1")
    )
    assert json.loads(route.calls.last.request.content) == {
        "model": OPENAI_MODEL,
        "input": "hello world",
        "encoding_format": "float",
        "dimensions": 2,
        "user": "u-1",
    }
    assert route.calls.last.request.headers["authorization"] == f"Bearer {KEY}"
    assert [list(v) for v in result.vectors] == [[0.5, -0.25]]
    assert result.model == OPENAI_MODEL
    assert result.usage == Usage(prompt_tokens=3, total_tokens=3)


async def test_openai_token_arrays_pass_as_lists_and_answers_are_put_in_input_order(
    openai_upstream: OpenAIUpstream, api: VendorStub
) -> None:
    answer = listed([1.0], [2.0], prompt_tokens=5)
    answer["data"].reverse()  # a server may answer out of order: the index decides
    route = api.post(PATH).respond(json=answer)
    result = await openai_upstream.embed(
        EmbeddingRequest("openai", OPENAI_MODEL, ((1, 2, 3), (4, 5)))
    )
    assert json.loads(route.calls.last.request.content) == {
        "model": OPENAI_MODEL,
        "input": [[1, 2, 3], [4, 5]],
        "encoding_format": "float",
    }
    assert [list(v) for v in result.vectors] == [[1.0], [2.0]]


async def test_openai_base64_vector_is_decoded_and_missing_usage_is_none(
    openai_upstream: OpenAIUpstream, api: VendorStub
) -> None:
    vector = [0.5, -1.25, 3.0]
    api.post(PATH).respond(
        json=listed(base64_vector(vector), prompt_tokens=None, model="served-name")
    )
    result = await openai_upstream.embed(EmbeddingRequest("openai", OPENAI_MODEL, ("x",)))
    assert [list(v) for v in result.vectors] == [vector]
    assert result.usage is None
    assert result.model == "served-name"


@pytest.mark.parametrize(
    "answer",
    [
        {"object": "list"},
        listed([0.1]),  # one vector for two inputs
        listed([0.1], ["not", "numbers"]),
        listed([0.1], "%%%not base64"),
        {"data": [{"index": 0, "embedding": [0.1]}, {"index": 0, "embedding": [0.2]}]},
    ],
    ids=["no-data", "short", "not-numbers", "bad-base64", "duplicate-index"],
)
async def test_openai_malformed_answers_are_upstream_errors(
    openai_upstream: OpenAIUpstream, api: VendorStub, answer: Any
) -> None:
    api.post(PATH).respond(json=answer)
    with pytest.raises(UpstreamError, match="could not read"):
        await openai_upstream.embed(EmbeddingRequest("openai", OPENAI_MODEL, ("a", "b")))


async def test_openai_vendor_errors_map_to_wire_errors(
    openai_upstream: OpenAIUpstream, api: VendorStub
) -> None:
    route = api.post(PATH)
    route.respond(429, json={"error": {"message": "slow down"}}, headers={"retry-after": "3"})
    with pytest.raises(RateLimited) as limited:
        await openai_upstream.embed(EmbeddingRequest("openai", OPENAI_MODEL, ("a",)))
    assert limited.value.retry_after == 3.0
    route.respond(400, json={"error": {"message": "This model does not support dimensions."}})
    with pytest.raises(InvalidRequest, match="does not support dimensions"):
        await openai_upstream.embed(EmbeddingRequest("openai", OPENAI_MODEL, ("a",)))


# --- the Gemini adapter (fake Gemini on a socket) ---------------------------------------------


@pytest.fixture
async def google(fake: FakeVendors) -> AsyncIterator[GoogleUpstream]:
    adapter = GoogleUpstream(api_key=KEY, base_url=fake.google_base_url)
    yield adapter
    await adapter.aclose()


async def test_gemini_one_input_is_embed_content(google: GoogleUpstream, fake: FakeVendors) -> None:
    result = await google.embed(
        EmbeddingRequest("google", GEMINI_MODEL, ("hello there",), dimensions=8, user="ignored")
    )
    (sent,) = fake.requests
    assert sent.path == f"/v1beta/models/{GEMINI_MODEL}:embedContent"
    assert sent.headers["x-goog-api-key"] == KEY
    assert sent.body == {
        "model": f"models/{GEMINI_MODEL}",
        "content": {"parts": [{"text": "hello there"}]},
        "outputDimensionality": 8,
    }
    assert [list(v) for v in result.vectors] == [fake_vector("hello there", 8)]
    assert result.usage is None  # Gemini reported no token count
    assert result.model == GEMINI_MODEL


async def test_gemini_several_inputs_are_one_batch_in_order(
    google: GoogleUpstream, fake: FakeVendors
) -> None:
    fake.script(Reply(prompt_tokens=11), vendor="google")
    result = await google.embed(EmbeddingRequest("google", f"models/{GEMINI_MODEL}", ("a", "b c")))
    (sent,) = fake.requests
    assert sent.path == f"/v1beta/models/{GEMINI_MODEL}:batchEmbedContents"
    assert sent.body == {
        "requests": [
            {"model": f"models/{GEMINI_MODEL}", "content": {"parts": [{"text": "a"}]}},
            {"model": f"models/{GEMINI_MODEL}", "content": {"parts": [{"text": "b c"}]}},
        ]
    }
    assert [list(v) for v in result.vectors] == [
        fake_vector("a", 3072),
        fake_vector("b c", 3072),
    ]
    assert result.usage == Usage(prompt_tokens=11, total_tokens=11)


async def test_gemini_refuses_token_ids_before_any_call(
    google: GoogleUpstream, fake: FakeVendors
) -> None:
    with pytest.raises(InvalidRequest, match=r"input\[1\] is a list of token ids"):
        await google.embed(EmbeddingRequest("google", GEMINI_MODEL, ("a", (1, 2))))
    assert fake.requests == []


async def test_gemini_vendor_errors_map_to_wire_errors(
    google: GoogleUpstream, fake: FakeVendors
) -> None:
    fake.script(Fault(status=429, retry_after=2), vendor="google", times=1)
    with pytest.raises(RateLimited) as limited:
        await google.embed(EmbeddingRequest("google", GEMINI_MODEL, ("a",)))
    assert limited.value.retry_after == 2.0
    fake.script(Fault(status=404), vendor="google", times=1)
    with pytest.raises(NotFound):
        await google.embed(EmbeddingRequest("google", GEMINI_MODEL, ("a", "b")))
    wrong = GoogleUpstream(api_key="wrong-key", base_url=fake.google_base_url)
    try:
        with pytest.raises(UpstreamError, match="refused the proxy's credentials"):
            await wrong.embed(EmbeddingRequest("google", GEMINI_MODEL, ("a",)))
    finally:
        await wrong.aclose()


# --- the fakes speak the real wire ------------------------------------------------------------


def test_fake_openai_through_the_sdk_floats_base64_and_token_counts(fake: FakeVendors) -> None:
    client = openai.OpenAI(base_url=fake.openai_base_url, api_key=KEY, max_retries=0)
    # No encoding_format: the SDK asks for base64 and decodes it itself.
    decoded = client.embeddings.create(model=OPENAI_MODEL, input=["one two", "three"])
    assert fake.requests[-1].body["encoding_format"] == "base64"
    assert [d.embedding for d in decoded.data] == [
        fake_vector("one two", 1536),
        fake_vector("three", 1536),
    ]
    assert [d.index for d in decoded.data] == [0, 1]
    assert decoded.usage.prompt_tokens == 3 and decoded.usage.total_tokens == 3
    floats = client.embeddings.create(
        model=OPENAI_MODEL, input=[[1, 2, 3]], dimensions=4, encoding_format="float"
    )
    assert floats.data[0].embedding == fake_vector([1, 2, 3], 4)
    assert floats.usage.prompt_tokens == 3
    raw = client.embeddings.create(
        model=OPENAI_MODEL, input="x", dimensions=2, encoding_format="base64"
    )
    packed = base64.b64decode(str(raw.data[0].embedding))
    assert list(struct.unpack("<2f", packed)) == fake_vector("x", 2)


def test_fake_openai_refuses_what_openai_refuses(fake: FakeVendors) -> None:
    client = openai.OpenAI(base_url=fake.openai_base_url, api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="does not support specifying dimensions"):
        client.embeddings.create(model="text-embedding-ada-002", input="x", dimensions=4)
    with pytest.raises(openai.BadRequestError, match=r"'\$\.input' is invalid"):
        client.embeddings.create(model=OPENAI_MODEL, input="")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=fake.openai_base_url, api_key="sk-wrong-0123456789", max_retries=0
        ).embeddings.create(model=OPENAI_MODEL, input="x")


def test_fake_gemini_batch_requires_the_url_model_in_every_request(fake: FakeVendors) -> None:
    url = f"{fake.google_base_url}/v1beta/models/{GEMINI_MODEL}:batchEmbedContents"
    answer = httpx.post(
        url,
        headers={"x-goog-api-key": KEY},
        json={"requests": [{"model": "models/other", "content": {"parts": [{"text": "a"}]}}]},
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert "models/gemini-embedding-001" in answer.json()["error"]["message"]


# --- the /v1/embeddings body and the route's helpers -----------------------------------------


def parse_body(body: Any) -> Any:
    return openai_embeddings.parse(json.dumps(body).encode(), syntactic_router)


@pytest.mark.parametrize(
    ("given", "inputs", "contents"),
    [
        ("one text", ("one text",), ["one text"]),
        (["a", "b c"], ("a", "b c"), ["a", "b c"]),
        ([5, 17, 0], ((5, 17, 0),), ["5 17 0"]),
        ([[1, 2], [300]], ((1, 2), (300,)), ["1 2", "300"]),
    ],
    ids=["string", "strings", "token-array", "token-arrays"],
)
def test_every_input_form_becomes_one_user_message_per_input(
    given: Any, inputs: tuple[Any, ...], contents: list[str]
) -> None:
    parsed = parse_body({"model": "google/gemini-embedding-001", "input": given})
    assert (parsed.request.provider, parsed.request.model) == ("google", "gemini-embedding-001")
    assert [m.content for m in parsed.request.messages] == contents
    assert {m.role for m in parsed.request.messages} == {"user"}
    fields = openai_embeddings.embedding_fields(parsed.raw)
    assert fields.inputs == inputs
    assert (fields.dimensions, fields.encoding_format, fields.user) == (None, "float", None)


def test_a_bare_model_goes_to_openai_and_optional_fields_are_read() -> None:
    parsed = parse_body(
        {
            "model": "text-embedding-3-small",
            "input": "x",
            "dimensions": 64,
            "encoding_format": "base64",
            "user": "u",
        }
    )
    assert (parsed.request.provider, parsed.request.model) == ("openai", "text-embedding-3-small")
    fields = openai_embeddings.embedding_fields(parsed.raw)
    assert (fields.dimensions, fields.encoding_format, fields.user) == (64, "base64", "u")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x"}, "model"),
        ({"model": "m"}, "input"),
        ({"model": "m", "input": ""}, "input.0"),
        ({"model": "m", "input": []}, "input"),
        ({"model": "m", "input": ["a", [1]]}, "input"),
        ({"model": "m", "input": [[1], []]}, "input.1"),
        ({"model": "m", "input": [-1]}, "input"),
        ({"model": "m", "input": ["x"] * 2049}, "input"),
        ({"model": "m", "input": "x", "dimensions": 0}, "dimensions"),
        ({"model": "m", "input": "x", "dimensions": True}, "dimensions"),
        ({"model": "m", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "m", "input": "x", "user": 7}, "user"),
        ({"model": "m", "input": "x", "temperature": 0}, "temperature"),
    ],
)
def test_bad_bodies_are_400s_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_body(body)
    assert refused.value.param == param


def test_estimate_is_a_token_per_four_characters_or_one_per_id() -> None:
    assert estimated_usage(["abcd", "abcde", "a"]) == Usage(prompt_tokens=4, total_tokens=4)
    assert estimated_usage([(1, 2, 3)]) == Usage(prompt_tokens=3, total_tokens=3)


def test_answer_is_openais_list_in_either_encoding() -> None:
    result = EmbeddingResult(vectors=[[0.5, -2.0], [1.0, 0.25]], model="m", usage=None)
    usage = Usage(prompt_tokens=5, total_tokens=5)
    assert answer(result, usage, "float") == {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 0, "embedding": [0.5, -2.0]},
            {"object": "embedding", "index": 1, "embedding": [1.0, 0.25]},
        ],
        "model": "m",
        "usage": {"prompt_tokens": 5, "total_tokens": 5},
    }
    encoded = answer(result, usage, "base64")["data"]
    assert isinstance(encoded, list)
    assert [item["embedding"] for item in encoded] == [
        base64_vector([0.5, -2.0]),
        base64_vector([1.0, 0.25]),
    ]
    assert struct.unpack("<2f", base64.b64decode(base64_floats([0.5, -2.0]))) == (0.5, -2.0)


def test_an_explicit_feature_list_must_name_embeddings() -> None:
    request = parse_body({"model": "text-embedding-3-small", "input": "x"}).request
    UserPermissions().authorize(request, "embeddings")  # no list: every feature
    UserPermissions.from_wire({"allowedFeatures": ["embeddings"]}).authorize(request, "embeddings")
    chat_only = UserPermissions.from_wire({"allowedFeatures": ["chat", "stream", "tools"]})
    with pytest.raises(Forbidden, match="feature 'embeddings' is not allowed"):
        chat_only.authorize(request, "embeddings")
