"""An ASGI app served by uvicorn in a thread, for the API tests (real HTTP, real client)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn


def serve(app: Any, port: int) -> Callable[[], None]:
    """Serve ``app`` on 127.0.0.1:``port`` until it answers; returns the function that stops it."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, f"uvicorn did not start on port {port}"

    def stop() -> None:
        server.should_exit = True
        thread.join(10)

    return stop
