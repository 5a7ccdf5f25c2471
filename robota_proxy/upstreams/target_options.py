"""What each target may take, phase by phase, and what it can do: its limits and capabilities.

A target is ``provider/model``. Its limits come from the global ``ROBOTA_UPSTREAM_*_TIMEOUT``
settings, overridden by the first ``ROBOTA_TARGET_OPTIONS`` pattern that matches it (a
reasoning model may need a longer first-token limit than a chat model). Whether it continues
an answer from an assistant prefill has a known default per vendor and model family, because
getting it wrong turns a recoverable stream into a 400: Anthropic models before Claude 4.6
accept a prefill, 4.6 and later refuse it ("This model does not support assistant message
prefill"); OpenAI's chat API does not continue a prefill (it writes a fresh answer after it),
and Gemini's behaviour is not documented, so both default to no.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass

from cachetools import LRUCache

from robota_proxy.settings import TargetOverrides

#: Claude families that refuse a prefill: 4.6 and later minor versions, and 5 onwards.
_CLAUDE_WITHOUT_PREFILL = re.compile(r"^claude-[a-z]+-(?:4-(?:[6-9]|\d{2,})|[5-9]|\d{2,})(?:\D|$)")


@dataclass(frozen=True, slots=True)
class PhaseLimits:
    """Seconds each phase of one attempt may take."""

    #: A non-streamed answer, whole (vendors send its headers with the answer).
    headers: float = 25.0
    #: A stream's first text or tool-call piece, from the start of the attempt.
    first_token: float = 15.0
    #: The longest gap between two events of a started stream.
    idle: float = 10.0


@dataclass(frozen=True, slots=True)
class TargetLimits:
    limits: PhaseLimits
    prefill: bool


def known_prefill(provider: str, model: str) -> bool:
    """Whether this target continues an answer from an assistant prefill, by default."""
    if provider == "anthropic":
        return not _CLAUDE_WITHOUT_PREFILL.match(model)
    return False


class TargetTable:
    """Limits and capabilities per target, resolved once per target and kept."""

    def __init__(
        self,
        defaults: PhaseLimits | None = None,
        overrides: Mapping[str, TargetOverrides] | None = None,
    ) -> None:
        self.defaults = defaults if defaults is not None else PhaseLimits()
        self.overrides = dict(overrides or {})
        # Bounded: a provider that passes any model name through lets callers name many.
        self._resolved: LRUCache[tuple[str, str], TargetLimits] = LRUCache(maxsize=4096)

    def get(self, provider: str, model: str) -> TargetLimits:
        key = (provider, model)
        found = self._resolved.get(key)
        if found is None:
            found = self._resolved[key] = self._resolve(provider, model)
        return found

    def _resolve(self, provider: str, model: str) -> TargetLimits:
        name = f"{provider}/{model}"
        chosen = next(
            (
                options
                for pattern, options in self.overrides.items()
                if fnmatch.fnmatchcase(name, pattern)
            ),
            TargetOverrides(),
        )
        base = self.defaults
        limits = PhaseLimits(
            headers=chosen.headers_timeout or base.headers,
            first_token=chosen.first_token_timeout or base.first_token,
            idle=chosen.idle_timeout or base.idle,
        )
        prefill = known_prefill(provider, model) if chosen.prefill is None else chosen.prefill
        return TargetLimits(limits, prefill)
