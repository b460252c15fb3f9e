"""Shutdown on SIGTERM / SIGINT: stop accepting, let running requests finish, then end the rest cleanly.

uvicorn stops accepting connections and waits for running requests; after its timeout it cancels
them, which cuts a stream off mid-way (no error, no ``[DONE]``). ``GracefulServer`` ends every
request still running after ``grace`` seconds through the engine loop instead: a stream then gets an
error chunk and ``[DONE]``, a plain request a 503, and only then does uvicorn close the connections.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import uvicorn

logger = logging.getLogger("preft.server")
FLUSH_S = 5.0  # after the grace period: time for the error chunks to reach the clients


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine_loop: Any, grace: float):
        config.timeout_graceful_shutdown = grace + FLUSH_S
        super().__init__(config)
        self.engine_loop, self.grace = engine_loop, grace

    async def shutdown(self, sockets: Any = None) -> None:
        def end_running() -> None:
            logger.info("shutdown: requests still running after %.1f s end with an error", self.grace)
            self.engine_loop.abort_all()

        timer = asyncio.get_running_loop().call_later(self.grace, end_running)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()
