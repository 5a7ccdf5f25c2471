"""Benchmark harness: a lean fake OpenAI upstream, a load generator, and the orchestration that
runs the upstream directly, through robota-proxy and (optionally) through LiteLLM's proxy.

Run ``python -m benchmarks.harness --help`` or ``nox -s bench -- --quick``.
"""
