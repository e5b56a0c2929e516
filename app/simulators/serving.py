"""What both simulators share: an aiohttp app served on a free loopback port, and their use as
async context managers (`async with FakeSlack() as slack:`)."""

from __future__ import annotations

from typing import Self

from aiohttp import web


class LoopbackServer:
    """Serves one aiohttp app on 127.0.0.1; subclasses build the app in `start`."""

    _runner: web.AppRunner | None = None

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        await self._stop_app()

    async def _serve_app(self, app: web.Application) -> int:
        """Serve `app` on a free port of 127.0.0.1, and return the port."""
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        return int(self._runner.addresses[0][1])

    async def _stop_app(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
