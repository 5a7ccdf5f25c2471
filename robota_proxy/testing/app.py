"""The one Starlette app that answers for all three vendors.

Each request goes the same way whatever the vendor: record it, check the key, check the
body, pick the scripted reply, apply faults, render. Vendor modules only render.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from robota_proxy.testing import embeddings
from robota_proxy.testing.anthropic_wire import AnthropicWire
from robota_proxy.testing.gemini_wire import GeminiWire
from robota_proxy.testing.openai_wire import OpenAIWire, models_list
from robota_proxy.testing.script import (
    Conversation,
    Fault,
    RecordedRequest,
    Reply,
    make_plan,
    refusal,
)
from robota_proxy.testing.sse import FaultyEventStream
from robota_proxy.testing.state import FakeState
from robota_proxy.testing.wire import Json, VendorWire, json_response

_GEMINI_ACTIONS = ("generateContent", "streamGenerateContent")
_GEMINI_EMBED_ACTIONS = ("embedContent", "batchEmbedContents")
#: Returned once the client has gone: nobody reads it (nginx's "client closed request").
_CLIENT_GONE = 499


def _parse(raw: bytes) -> tuple[Json, str | None]:
    try:
        body: Any = json.loads(raw) if raw else None
    except ValueError:
        return {}, "We could not parse the JSON body of your request."
    if not isinstance(body, dict):
        return {}, "The request body must be a JSON object."
    return body, None


class FakeVendorApp:
    """Holds what the handlers share; ``starlette`` is the ASGI app to serve."""

    def __init__(self, state: FakeState, api_key: str) -> None:
        self._state = state
        self._api_key = api_key
        self._openai = OpenAIWire()
        self._anthropic = AnthropicWire()
        self._gemini = GeminiWire()
        self.starlette = Starlette(
            routes=[
                Route("/v1/chat/completions", self._openai_chat, methods=["POST"]),
                Route("/v1/models", self._openai_models, methods=["GET"]),
                Route("/v1/embeddings", self._openai_embeddings, methods=["POST"]),
                Route("/v1/messages", self._anthropic_messages, methods=["POST"]),
                Route("/v1/messages/count_tokens", self._anthropic_count, methods=["POST"]),
                Route("/v1beta/models/{target}", self._gemini_call, methods=["POST"]),
                Route("/v1/models/{target}", self._gemini_call, methods=["POST"]),
            ]
        )

    async def _openai_chat(self, request: Request) -> Response:
        body, problem = _parse(await request.body())
        model = str(body.get("model", ""))
        stream = body.get("stream") is True
        return await self._exchange(request, self._openai, body, problem, model, stream)

    async def _openai_models(self, request: Request) -> Response:
        self._state.record(
            RecordedRequest(
                vendor="openai",
                path=request.url.path,
                headers=dict(request.headers),
                body={},
                stream=False,
            )
        )
        denied = self._openai.auth_error(request, self._api_key)
        return denied or json_response(models_list(), headers=self._openai.headers())

    async def _anthropic_messages(self, request: Request) -> Response:
        body, problem = _parse(await request.body())
        model = str(body.get("model", ""))
        stream = body.get("stream") is True
        return await self._exchange(request, self._anthropic, body, problem, model, stream)

    async def _anthropic_count(self, request: Request) -> Response:
        body, problem = _parse(await request.body())
        wire = self._anthropic
        conversation = wire.summarize(body)
        self._state.record(
            RecordedRequest(
                vendor="anthropic",
                path=request.url.path,
                headers=dict(request.headers),
                body=body,
                stream=False,
                model=str(body.get("model", "")),
                last_role=conversation.last_role,
                last_text=conversation.last_text,
                prefill=conversation.prefill,
            )
        )
        denied = wire.auth_error(request, self._api_key)
        if denied is not None:
            return denied
        problem = problem or wire.invalid({"max_tokens": 1, **body})
        if problem is not None:
            return wire.error(400, problem)
        return json_response(wire.count_tokens(body), headers=wire.headers())

    async def _gemini_call(self, request: Request) -> Response:
        model, _, action = str(request.path_params["target"]).rpartition(":")
        if action in _GEMINI_EMBED_ACTIONS and model:
            return await self._gemini_embed(request, model, action)
        if action not in _GEMINI_ACTIONS or not model:
            return self._gemini.error(404, f"Unknown method {action!r} on models/{model}.")
        body, problem = _parse(await request.body())
        stream = action == "streamGenerateContent"
        sse = request.query_params.get("alt") == "sse"
        return await self._exchange(request, self._gemini, body, problem, model, stream, sse)

    async def _openai_embeddings(self, request: Request) -> Response:
        body, problem = _parse(await request.body())
        texts = [
            item if isinstance(item, str) else " ".join(map(str, item))
            for item in embeddings.openai_inputs(body) or []
        ]
        return await self._embedding_exchange(
            request,
            self._openai,
            body,
            problem or embeddings.openai_invalid(body),
            str(body.get("model", "")),
            texts,
            lambda tokens: embeddings.openai_reply(body, tokens),
        )

    async def _gemini_embed(self, request: Request, model: str, action: str) -> Response:
        body, problem = _parse(await request.body())
        return await self._embedding_exchange(
            request,
            self._gemini,
            body,
            problem or embeddings.gemini_invalid(action, model, body),
            model,
            embeddings.gemini_texts(action, body),
            lambda tokens: embeddings.gemini_reply(action, model, body, tokens),
        )

    async def _hold(self, request: Request, seconds: float) -> bool:
        """Wait ``seconds``, but no longer than the client stays: True if it went away.

        Uvicorn does not cancel a handler whose client disconnects, so a plain sleep with a
        long ``latency`` (a silent vendor) would outlive the test and hold the server's
        shutdown; listening for ``http.disconnect`` ends the wait at once instead.
        """
        left = False
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                nonlocal left
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                left = True
                group.cancel_scope.cancel()

            group.start_soon(watch)
            await anyio.sleep(seconds)
            group.cancel_scope.cancel()
        if left:
            self._state.wait_abandoned()
        return left

    async def _embedding_exchange(
        self,
        request: Request,
        wire: VendorWire,
        body: Json,
        problem: str | None,
        model: str,
        texts: list[str],
        render: Callable[[int | None], Json],
    ) -> Response:
        """Record, check the key, check the body, apply a scripted fault, render. A rule's
        ``match`` is tested against the inputs joined by newlines; a ``Reply``'s
        ``prompt_tokens`` replaces the counted tokens (and makes Gemini report them)."""
        recorded = RecordedRequest(
            vendor=wire.vendor,
            path=request.url.path,
            headers=dict(request.headers),
            body=body,
            stream=False,
            model=model,
            last_role="user" if texts else "none",
            last_text="\n".join(texts),
        )
        self._state.record(recorded)
        denied = wire.auth_error(request, self._api_key)
        if denied is not None:
            return denied
        if problem is not None:
            return wire.error(400, problem)
        chosen = self._state.choose(recorded)
        fault = chosen if isinstance(chosen, Fault) else None
        if isinstance(chosen, Reply):
            fault = chosen.fault
        if fault is not None and fault.latency > 0 and await self._hold(request, fault.latency):
            return Response(status_code=_CLIENT_GONE)
        if fault is not None and fault.status is not None:
            return wire.error(fault.status, fault.message, fault.retry_after)
        tokens = chosen.prompt_tokens if isinstance(chosen, Reply) else None
        return json_response(render(tokens), headers=wire.headers())

    async def _exchange(
        self,
        request: Request,
        wire: VendorWire,
        body: Json,
        problem: str | None,
        model: str,
        stream: bool,
        sse: bool = True,
    ) -> Response:
        conversation = _with_prefill(wire, body, wire.summarize(body))
        recorded = RecordedRequest(
            vendor=wire.vendor,
            path=request.url.path,
            headers=dict(request.headers),
            body=body,
            stream=stream,
            model=model,
            last_role=conversation.last_role,
            last_text=conversation.last_text,
            prefill=conversation.prefill,
        )
        self._state.record(recorded)
        denied = wire.auth_error(request, self._api_key)
        if denied is not None:
            return denied
        problem = problem or wire.invalid(body)
        if problem is not None:
            return wire.error(400, problem)
        prefill_mode = self._state.prefill_mode(wire.vendor)
        if conversation.prefill is not None and prefill_mode == "reject":
            return wire.error(400, wire.prefill_refused)

        plan = make_plan(
            self._state.choose(recorded), conversation, continue_prefill=prefill_mode == "continue"
        )
        fault = plan.fault
        if fault is not None and fault.latency > 0 and await self._hold(request, fault.latency):
            return Response(status_code=_CLIENT_GONE)
        if fault is not None and fault.error_kind is not None:
            kind_error = wire.kind_error(fault.error_kind, fault.message)
            if kind_error is not None:
                return kind_error
            plan = refusal(plan)
        elif fault is not None and fault.status is not None:
            return wire.error(fault.status, fault.message, fault.retry_after)
        if not stream:
            # Nothing of a JSON answer can go early: a slow first token delays all of it.
            if (
                fault is not None
                and fault.first_token_latency > 0
                and await self._hold(request, fault.first_token_latency)
            ):
                return Response(status_code=_CLIENT_GONE)
            return json_response(wire.reply(plan, model), headers=wire.headers())
        events = wire.events(plan, model, body)
        if not sse:  # Gemini without alt=sse streams one JSON array
            array = "[" + ",\r\n".join(event.data for event in events) + "]"
            return Response(array.encode(), media_type="application/json")
        return FaultyEventStream(
            events, state=self._state, fault=fault, newline=wire.newline, headers=wire.headers()
        )


def _with_prefill(wire: VendorWire, body: Json, conversation: Conversation) -> Conversation:
    """A conversation that ends in an assistant text is a prefill of the answer to the turn
    before it: summarised as that turn, with the prefill beside it."""
    if conversation.last_role != "assistant" or not conversation.last_text:
        return conversation
    key = "contents" if wire.vendor == "google" else "messages"
    turns = body.get(key)
    if not isinstance(turns, list) or len(turns) < 2:
        return replace(conversation, prefill=conversation.last_text)
    before = wire.summarize({**body, key: turns[:-1]})
    return replace(before, words=conversation.words, prefill=conversation.last_text)
