"""What every layer may share about the wire, beside ``robota_proxy.scope``.

- ``sse``: Server-Sent Events framing of the chat stream;
- ``paths``: the chat paths (below any mount point) and the feature each one uses;
- ``bearer``: the ``Authorization: Bearer`` credential and the client address of a request.

Middleware, routes and streams import these from here, never from each other (DESIGN.md,
"Dependencies flow one way"; ``tests/unit/test_import_direction.py`` holds the rules). Modules
here import only the shared layer: ``scope``, ``errors``, ``dialects``, ``policy.refusals``
and ``robota_client.messages``.
"""
