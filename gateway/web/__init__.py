"""The demo web page: a chat that streams paced answers, the stream's live state, and a burst control.

Off by default (``demo.enabled``; ``tokenflow serve --demo``). The page is static files with no build step
(``static/``); it talks to the gateway through the public API only (chat completions with SSE,
``GET /v1/streams/{id}``, ``POST /v1/streams/{id}/progress``), plus ``/demo/info`` and ``/demo/burst`` for
the burst of simulated users (:mod:`.burst`). :func:`register` is the one hook the application calls.
"""

from __future__ import annotations

from .routes import DEMO_ENGINES, register

__all__ = ["DEMO_ENGINES", "register"]
