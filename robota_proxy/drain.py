"""Whether this process is draining: it got SIGTERM (or SIGINT) and is finishing what it had.

A flag per process, not per app: the signal belongs to the process, and every proxy app in it
(one standalone, or several mounted) is then on its way out. ``robota-proxy serve`` sets it
from its uvicorn server (``robota_proxy.serving``); a host app that mounts the proxy and
handles its own signals calls :func:`begin` when its shutdown starts, so that ``/ready``
answers 503 while the host's server lets the running calls finish.
"""

from __future__ import annotations

import threading

_draining = threading.Event()


def begin() -> None:
    """From now on ``/ready`` says ``not_ready`` (check ``draining``): load balancers that
    still probe this process take it out of rotation while its running calls finish."""
    _draining.set()


def is_draining() -> bool:
    return _draining.is_set()


def reset() -> None:
    """For tests that drain an app and then go on in the same process."""
    _draining.clear()
