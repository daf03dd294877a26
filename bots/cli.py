"""Terminal chat: ``threadbot chat`` (also ``python -m bots.cli``).

Tokens print as they arrive. History persists in the store, one conversation per user unless
``--conversation NAME`` names another. Ctrl-C during an answer stops that answer; Ctrl-C at the
prompt, Ctrl-D or closed stdin exits with status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import logging
import os
import signal
import sys
import threading
from typing import TextIO

from core.commands import parse_command
from core.config import Settings
from core.conversation import ConversationKey, IncomingMessage
from core.engine import ChatEngine
from core.errors import ConfigError, ThreadbotError

PLATFORM = "cli"
WORKSPACE = "local"
PROMPT = "you › "
STOPPED_NOTE = "[stopped]"
CLI_ONLY_HELP = "• `/context` — what the next request would send\n• `/exit` — leave (also Ctrl-D)"


class TerminalReply:
    """A ReplySink that prints to a terminal or a pipe as tokens arrive."""

    def __init__(self, out: TextIO, err: TextIO, *, interactive: bool) -> None:
        self.out = out
        self.err = err
        self.interactive = interactive
        self.failed = False
        # Set when whoever reads our output went away (``threadbot chat | head -1``).
        self.closed = False
        self._at_line_start = True

    def _print(self, text: str) -> None:
        if self.closed:
            return
        try:
            self.out.write(text)
            self.out.flush()
        except BrokenPipeError:
            self.closed = True
            _silence(self.out)
            return
        if text:
            self._at_line_start = text.endswith("\n")

    def _newline(self) -> None:
        if not self._at_line_start:
            self._print("\n")

    async def begin(self) -> None:
        if self.interactive:
            self._print("bot › ")

    def write(self, delta: str) -> None:
        self._print(delta)

    async def retrying(self, notice: str) -> None:
        # A terminal cannot take back printed text: say that the answer starts over.
        self._newline()
        self._print(f"[{notice.strip('_')} The answer starts over.]\n")

    async def finish(self) -> list[str]:
        self._newline()
        return []

    async def fail(self, message: str) -> None:
        self.failed = True
        self._newline()
        self.err.write(f"error: {message}\n")
        self.err.flush()

    async def cancel(self, note: str) -> None:
        self._newline()
        self._print(f"{STOPPED_NOTE} {note}\n")


def _silence(stream: TextIO) -> None:
    """Point a closed output at /dev/null so the interpreter's last flush stays quiet."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


class LineReader:
    """Reads stdin lines on a thread so the event loop (and Ctrl-C) stays responsive."""

    def __init__(self, stream: TextIO, loop: asyncio.AbstractEventLoop) -> None:
        self.stream = stream
        self.loop = loop
        self._wanted = threading.Semaphore(0)
        self._lines: asyncio.Queue[str | None] = asyncio.Queue()
        threading.Thread(target=self._run, name="stdin-reader", daemon=True).start()

    def _run(self) -> None:
        while True:
            self._wanted.acquire()
            try:
                line = self.stream.readline()
            except (OSError, ValueError):
                line = ""
            self.loop.call_soon_threadsafe(self._lines.put_nowait, line or None)
            if not line:
                return

    async def readline(self) -> str | None:
        """The next line without its newline, or None at end of input."""
        self._wanted.release()
        line = await self._lines.get()
        return None if line is None else line.rstrip("\r\n")


async def run_chat(
    settings: Settings,
    conversation: str,
    *,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
    stderr: TextIO = sys.stderr,
) -> int:
    """The chat loop; returns the exit status."""
    interactive = stdin.isatty()
    engine = await ChatEngine.create(settings)
    key = ConversationKey(PLATFORM, WORKSPACE, conversation)
    loop = asyncio.get_running_loop()
    turn: asyncio.Task[object] | None = None
    reading: asyncio.Task[str | None] | None = None
    interrupted_at_prompt = False

    def on_sigint() -> None:
        nonlocal interrupted_at_prompt
        if turn is not None and not turn.done():
            turn.cancel()
        elif reading is not None and not reading.done():
            interrupted_at_prompt = True
            reading.cancel()

    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    status = 0
    try:
        if engine.provider.is_offline and not interactive:
            # Interactive sessions see it in the banner; piped ones on stderr, out of the answer.
            stderr.write(f"threadbot: {engine.provider.label}\n")
        if interactive:
            stdout.write(
                f"threadbot · {engine.provider.label} · conversation “{conversation}” · "
                "/help for commands, Ctrl-D to leave\n"
            )
            stdout.flush()
        reader = LineReader(stdin, loop)
        while True:
            if interactive:
                stdout.write(PROMPT)
                stdout.flush()
            reading = asyncio.ensure_future(reader.readline())
            try:
                line = await reading
            except asyncio.CancelledError:
                if interrupted_at_prompt:
                    stdout.write("\n")
                    break
                raise
            if line is None:
                if interactive:
                    stdout.write("\n")
                break
            if not line.strip():
                continue
            if line.strip().startswith("/"):
                if not await _command(engine, key, line.strip(), stdout, stderr):
                    break
                continue
            reply = TerminalReply(stdout, stderr, interactive=interactive)
            incoming = IncomingMessage(
                key=key, text=line, user_id=conversation, allow_commands=False
            )
            turn = asyncio.ensure_future(engine.handle(incoming, reply))
            with contextlib.suppress(asyncio.CancelledError):
                await turn
            turn = None
            if reply.failed and not interactive:
                status = 1
            if reply.closed:
                break
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
        await engine.close()
    stdout.flush()
    return status


async def _command(
    engine: ChatEngine, key: ConversationKey, line: str, out: TextIO, err: TextIO
) -> bool:
    """Run a /command; False when the chat should end."""
    word = line.split()[0].lower()
    if word in ("/exit", "/quit"):
        return False
    if word == "/context":
        window = await engine.context(key)
        if window is None:
            out.write("No messages yet: the next request sends only the system prompt.\n")
        else:
            out.write(f"The next request sends your message after {window.describe()}.\n")
        out.flush()
        return True
    command = parse_command(line)
    if command is None:
        err.write(f"Unknown command {word}. Type /help for the commands.\n")
        err.flush()
        return True
    answer = await engine.run_command(command, key)
    if command.action == "help":
        answer += "\n" + CLI_ONLY_HELP
    out.write(answer.replace("`", "") + "\n")
    out.flush()
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="threadbot chat", description="Chat in the terminal.")
    parser.add_argument(
        "--conversation",
        "-c",
        default=None,
        help="name of the conversation to resume or start (default: one per user)",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="log to stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.CRITICAL,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = Settings.load()
        name = args.conversation or getpass.getuser()
        return asyncio.run(run_chat(settings, name))
    except ConfigError as error:
        sys.stderr.write(f"threadbot: {error}\n")
        return 2
    except ThreadbotError as error:
        sys.stderr.write(f"threadbot: {error}\n")
        return 1
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # Output closed while we wrote a prompt or a command's answer: nothing more to say.
        _silence(sys.stdout)
        return 0


if __name__ == "__main__":
    sys.exit(main())
