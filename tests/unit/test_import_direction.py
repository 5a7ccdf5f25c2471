"""The package graph runs the way DESIGN.md says ("Dependencies flow one way").

Every module of ``robota_proxy`` and ``robota_client`` is parsed (``ast``, nothing imported)
and every import it states is checked: top-level ones, lazy ones inside functions (a lazy
import is still a dependency) and ``if TYPE_CHECKING:`` ones (a type is one too). Each module
belongs to one layer (``LAYER_OF``, longest prefix wins); a layer may import itself and what
``MAY_IMPORT`` lists for it, nothing else. A violation is printed as
``module -> imported (rule)``.

THE RULE TABLE (DESIGN.md's paragraph, completed; "+" marks where it goes beyond DESIGN.md)

  layer          may import (besides itself)                        why
  shared         -                                                  what every layer may share:
                 scope, wire/ (SSE framing, chat paths, bearer parsing), errors, settings,
                 robota_client.messages (DESIGN.md), and +call_record (the scope's CALL slip
                 every layer writes on), +dialects/, chat_body, responses (the surfaces'
                 body and error formats: "a wire-level layer", dialects/__init__ says),
                 +policy.refusals (the refusal a malformed bearer header is; imports nothing)
  support   +    shared                                             leaf helpers any layer
                 may use: redis_failure (Redis-down policy), drain (shutdown flag),
                 observability.throttled_log (rate-limited warnings)
  policy         shared, support                                    reaches storage only
                 through protocols it defines (policy.key_directory.KeyDirectory)
  storage        shared, support, policy,                           data types of policy;
                 +upstreams.breakers                                the Breakers protocol its
                 Redis backend implements (the same inversion as KeyDirectory)
  streams   +    shared, support                                    buffers and the stream
                 response: below routes, which read them
  upstreams      shared, support, policy.principals,                DESIGN.md, plus
                 +observability.tracing                             the client span per attempt
  observability+ shared, support, policy, upstreams                 it records what the others
                 do: labels from principals and targets; metrics implements resilience's
                 AttemptCounter, tracing reads upstreams.base.FinishEvent (lazily)
  middleware     shared, support, policy, storage, +observability   DESIGN.md, plus the
                 request context's logs/metrics/traces and metering's alerts
  routes         shared, support, upstreams, policy, storage,       DESIGN.md, plus
                 streams, +observability                            /metrics' registry;
                 openapi.py is in this layer (the document the routes serve, built from their
                 constants)
  root      +    everything but testing                             the composition root:
                 robota_proxy/__init__, __main__, app, cli*, launcher, serving, banner,
                 preflight, config_errors, http_guard (the server's protocol class)
  testing        shared                                             fake vendors; imported
                 only by tests, examples and benchmarks (nothing under robota_proxy)
  client         robota_client.messages                             never robota_proxy

Middleware and routes never import each other: neither is in the other's list.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("robota_proxy", "robota_client")

#: Module (or package) -> layer; the longest matching prefix wins.
LAYER_OF: dict[str, str] = {
    # shared: what every layer may import
    "robota_proxy.scope": "shared",
    "robota_proxy.wire": "shared",
    "robota_proxy.errors": "shared",
    "robota_proxy.settings": "shared",
    "robota_client.messages": "shared",
    "robota_proxy.call_record": "shared",
    "robota_proxy.dialects": "shared",
    "robota_proxy.chat_body": "shared",
    "robota_proxy.responses": "shared",
    "robota_proxy.policy.refusals": "shared",
    # support: leaf helpers
    "robota_proxy.redis_failure": "support",
    "robota_proxy.drain": "support",
    "robota_proxy.observability.throttled_log": "support",
    # the layers of DESIGN.md's layout
    "robota_proxy.policy": "policy",
    "robota_proxy.storage": "storage",
    "robota_proxy.streams": "streams",
    "robota_proxy.upstreams": "upstreams",
    "robota_proxy.observability": "observability",
    "robota_proxy.middleware": "middleware",
    "robota_proxy.routes": "routes",
    "robota_proxy.openapi": "routes",
    "robota_proxy.testing": "testing",
    "robota_client": "client",
    # the composition root (the package itself matches only exactly: a new top-level module
    # must be given a place here)
    "robota_proxy": "root",
    "robota_proxy.__main__": "root",
    "robota_proxy.app": "root",
    "robota_proxy.cli": "root",
    "robota_proxy.cli_database": "root",
    "robota_proxy.cli_keys": "root",
    "robota_proxy.cli_usage": "root",
    "robota_proxy.launcher": "root",
    "robota_proxy.serving": "root",
    "robota_proxy.banner": "root",
    "robota_proxy.preflight": "root",
    "robota_proxy.config_errors": "root",
    "robota_proxy.http_guard": "root",
}
#: Keys that name a module only, not the modules below it.
EXACT_ONLY = frozenset({"robota_proxy"})

_BELOW_ROOT = frozenset(set(LAYER_OF.values()) - {"root", "testing", "client"})

#: Layer -> what it may import besides itself: layer names, or module prefixes (dotted).
MAY_IMPORT: dict[str, frozenset[str]] = {
    "shared": frozenset(),
    "support": frozenset({"shared"}),
    "policy": frozenset({"shared", "support"}),
    "storage": frozenset({"shared", "support", "policy", "robota_proxy.upstreams.breakers"}),
    "streams": frozenset({"shared", "support"}),
    "upstreams": frozenset(
        {
            "shared",
            "support",
            "robota_proxy.policy.principals",
            "robota_proxy.observability.tracing",
        }
    ),
    "observability": frozenset({"shared", "support", "policy", "upstreams"}),
    "middleware": frozenset({"shared", "support", "policy", "storage", "observability"}),
    "routes": frozenset(
        {"shared", "support", "upstreams", "policy", "storage", "streams", "observability"}
    ),
    "root": _BELOW_ROOT,
    "testing": frozenset({"shared"}),
    "client": frozenset({"robota_client.messages"}),
}

#: Known debt: (importer, imported) pairs let through, each with its reason. Keep it short;
#: an entry that no longer occurs fails the test, so the list cannot go stale.
ALLOWED: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def layer_of(module: str) -> str:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYER_OF and (n == len(parts) or key not in EXACT_ONLY):
            return LAYER_OF[key]
    raise KeyError(module)


def _resolve(name: str) -> str | None:
    """The module an imported name lives in: the longest prefix that is a module of ours."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> Iterator[str]:
    """Every module of ours that ``module`` imports, wherever the import statement is."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            # ``from package import module`` depends on the module, not on the package's
            # ``__init__`` (which runs anyway, for any submodule).
            names = [f"{source}.{alias.name}" for alias in node.names]
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                yield target


def allows(layer: str, target: str) -> bool:
    target_layer = layer_of(target)
    if target_layer == layer:
        return True
    for entry in MAY_IMPORT[layer]:
        if "." in entry:
            if target == entry or target.startswith(entry + "."):
                return True
        elif entry == target_layer:
            return True
    return False


def _rule(layer: str) -> str:
    return f"{layer} may import {', '.join(sorted(MAY_IMPORT[layer])) or 'only itself'}"


def violations() -> list[tuple[str, str, str]]:
    found: set[tuple[str, str, str]] = set()
    for module in MODULES:
        layer = layer_of(module)
        for target in imports_of(module):
            if module.startswith("robota_client") and target.startswith("robota_proxy"):
                found.add((module, target, "robota_client never imports robota_proxy"))
            elif not allows(layer, target):
                rule = f"{layer} -> {layer_of(target)}: {_rule(layer)}"
                if layer_of(target) == "testing":
                    rule = "nothing imports testing/ but tests, examples and benchmarks"
                found.add((module, target, rule))
    return sorted(found)


def test_every_module_has_a_layer() -> None:
    missing = []
    for module in MODULES:
        try:
            layer_of(module)
        except KeyError:
            missing.append(module)
    assert not missing, f"give these modules a layer in LAYER_OF: {missing}"


def test_the_rules_are_about_real_modules() -> None:
    for layer, allowed in MAY_IMPORT.items():
        for entry in allowed:
            if "." in entry:
                assert entry in MODULES, f"{layer}: {entry} is not a module"
            else:
                assert entry in MAY_IMPORT, f"{layer}: {entry} is not a layer"


def test_imports_follow_the_documented_direction() -> None:
    found = violations()
    unexplained = [v for v in found if (v[0], v[1]) not in ALLOWED]
    for module, imported, rule in unexplained:
        print(f"{module} -> {imported} ({rule})")
    assert not unexplained, "imports against DESIGN.md's direction:\n" + "\n".join(
        f"  {module} -> {imported} ({rule})" for module, imported, rule in unexplained
    )
    stale = set(ALLOWED) - {(v[0], v[1]) for v in found}
    assert not stale, f"allowed imports that no longer occur; remove them from ALLOWED: {stale}"


def test_the_checker_sees_lazy_and_type_checking_imports() -> None:
    # middleware/request_context.py imports ProxyMetrics under TYPE_CHECKING, and
    # observability/tracing.py imports upstreams.base inside a function.
    assert "robota_proxy.observability.metrics" in set(
        imports_of("robota_proxy.middleware.request_context")
    )
    assert "robota_proxy.upstreams.base" in set(imports_of("robota_proxy.observability.tracing"))


def test_a_forbidden_import_is_reported() -> None:
    assert not allows("middleware", "robota_proxy.routes.chat")
    assert not allows("routes", "robota_proxy.middleware.auth")
    assert not allows("policy", "robota_proxy.storage.key_store")
    assert not allows("upstreams", "robota_proxy.storage.usage_store")
    assert not allows("storage", "robota_proxy.middleware.metering")
    assert not allows("root", "robota_proxy.testing.server")
    assert allows("routes", "robota_proxy.wire.sse")
