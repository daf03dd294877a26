"""A TCP forwarder on 127.0.0.1 that a test cuts and restores: a database outage on demand.

``cut("refuse")`` is a server that is down (every new connection is closed at once);
``cut("hang")`` is a dead network (new connections are accepted and never answered, so the
client waits for its own timeout). Both first close every connection open through the proxy,
as a restarted server or a dropped link does. ``restore()`` forwards again; connections left
hanging are closed then, since they never reached the server.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal, Self

from sqlalchemy.engine import make_url

CutMode = Literal["refuse", "hang"]
CHUNK_BYTES = 65536


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target_host``:``target_port`` until cut."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.mode: CutMode | None = None
        #: Connections forwarded, closed at once, and left hanging (what the test exercised).
        self.forwarded = 0
        self.refused = 0
        self.hung = 0
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._hanging: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def to_database(cls, url: str) -> TcpProxy:
        """A proxy in front of the server of a database URL."""
        parsed = make_url(url)
        return cls(parsed.host or "127.0.0.1", parsed.port or 5432)

    def database_url(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's."""
        proxied = make_url(url).set(host="127.0.0.1", port=self.port)
        return proxied.render_as_string(hide_password=False)

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self._abort(self._open | self._hanging)
        if self._tasks:
            await asyncio.wait(self._tasks)
        await self._server.wait_closed()

    def cut(self, mode: CutMode = "refuse") -> None:
        """Close every open connection; from now on refuse or hang new ones."""
        self.mode = mode
        self._abort(self._open)

    def restore(self) -> None:
        """Forward new connections again."""
        self.mode = None
        self._abort(self._hanging)

    @staticmethod
    def _abort(writers: set[asyncio.StreamWriter]) -> None:
        for writer in list(writers):
            writer.transport.abort()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "refuse":
            self.refused += 1
            writer.transport.abort()
            return
        if self.mode == "hang":
            await self._hang(reader, writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        if self.mode is not None:  # cut while we were connecting
            up_writer.transport.abort()
            writer.transport.abort()
            return
        self.forwarded += 1
        self._open |= {writer, up_writer}
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._open -= {writer, up_writer}

    async def _hang(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Take what the client sends and never answer, until it gives up or ``restore``."""
        self.hung += 1
        self._hanging.add(writer)
        try:
            with contextlib.suppress(OSError):
                while await reader.read(CHUNK_BYTES):
                    pass
        finally:
            self._hanging.discard(writer)
            writer.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until either side closes; then close the other (a dropped link drops both ways)."""
    try:
        while data := await reader.read(CHUNK_BYTES):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.transport.abort()
