"""The chat loop, its commands and ``main``: see the package docstring."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import signal
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TextIO

from bots.cli.keyboard import PipedReader, TerminalReader, history_path
from bots.cli.output import MarkdownReply, PlainReply, silence
from bots.cli.terminal import TerminalModes
from core.commands import parse_command
from core.config import Settings
from core.conversation import ConversationKey, IncomingMessage
from core.errors import ConfigError, ThreadbotError
from core.feedback import BAD, GOOD, VALUE_NAMES
from core.logs import configure_logging, report_failure, show_tracebacks

if TYPE_CHECKING:  # the engine loads the store and a provider SDK: imported when a chat starts
    from rich.console import Console

    from core.engine import ChatEngine

PLATFORM = "cli"
WORKSPACE = "local"
PROMPT = "you › "
EXIT_COMMANDS = ("/exit", "/quit")
#: Rating the conversation's last answer: the word and its value (core.feedback).
RATINGS = {"/good": GOOD, "/bad": BAD}
#: Characters of the rated answer quoted back, so the user sees which one was rated.
RATED_PREVIEW_CHARS = 60
#: Exit status after SIGTERM, as a shell reports a process ended by it (128 + 15).
TERMINATED_STATUS = 128 + signal.SIGTERM

TERMINAL_HELP = """\
Type a message and press Enter; the answer appears as it is written.
  /reset               start this conversation over (earlier messages are no longer sent)
  /system              show the system prompt in use
  /system <text>       set this conversation's system prompt
  /system clear        go back to the default system prompt
  /history             how much of the conversation each request sends
  /history count 30, /history tokens 6000, /history summary 6000, /history clear
                       change that for this conversation
  /model               the model answering this conversation, and the choices (MODELS)
  /model <name>        answer this conversation with another model
  /model clear         go back to the default model
  /context             what the next request would send
  /good [reason]       rate the last answer as good (a reason is optional)
  /bad [reason]        rate the last answer as bad, and say why if you like
  /help                this help
  /exit, /quit         leave (so does Ctrl-D at the prompt)
Ctrl-C stops an answer while it is being written; at the prompt, Ctrl-C leaves.
Keys typed during an answer wait for the next prompt. ↑ and ↓ recall earlier lines (kept
across runs), ← and → move in the line, Ctrl-R searches what you typed before.
This is conversation “{conversation}”; `threadbot chat --conversation NAME` opens another."""

Reply = PlainReply | MarkdownReply


class Chat:
    """One terminal chat session: reads lines, runs commands, hands questions to the engine."""

    def __init__(
        self,
        engine: ChatEngine,
        conversation: str,
        *,
        stdin: TextIO,
        stdout: TextIO,
        stderr: TextIO,
    ) -> None:
        self.engine = engine
        self.conversation = conversation
        self.key = ConversationKey(PLATFORM, WORKSPACE, conversation)
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.interactive = stdin.isatty()
        self.modes = TerminalModes(stdin)
        self.status = 0
        self._console = _console(stdout)
        # What Ctrl-C does now: stop the answer, leave the prompt, or nothing (a command runs).
        self._interrupt: Callable[[], object] = _ignore
        self._terminated = False

    async def run(self) -> int:
        """The loop; returns the exit status."""
        loop = asyncio.get_running_loop()
        if self.interactive:
            reader: PipedReader | TerminalReader = TerminalReader(
                PROMPT, history_path(self.engine.settings.database_url), loop
            )
        else:
            reader = PipedReader(self.stdin, loop)
        try:
            with (
                _on_signal(signal.SIGINT, lambda: self._interrupt()),
                _on_signal(signal.SIGTERM, self._terminate),
            ):
                self._banner()
                while not self._terminated and (line := await self._read(reader)) is not None:
                    if not await self._take(line) or self._terminated:
                        break
        finally:
            reader.close()
            self.modes.restore()
        return self.status

    def _terminate(self) -> None:
        """SIGTERM: stop whatever runs and leave the usual way, so the terminal is restored."""
        self._terminated = True
        self.status = TERMINATED_STATUS
        self._interrupt()

    def _banner(self) -> None:
        provider = self.engine.provider
        if provider.is_offline and not self.interactive:
            # Interactive sessions see it in the banner; piped ones on stderr, out of the answer.
            self.stderr.write(f"threadbot: {provider.label}\n")
        if self.interactive:
            self.stdout.write(
                f"threadbot · {provider.label} · conversation “{self.conversation}” · "
                "/help for commands, Ctrl-D to leave\n"
            )
            self.stdout.flush()

    async def _read(self, reader: PipedReader | TerminalReader) -> str | None:
        """The next line; None at the end of input or on Ctrl-C at the prompt."""
        reading = asyncio.ensure_future(reader.readline())
        self._interrupt = reading.cancel
        try:
            line = await reading
        except asyncio.CancelledError:
            if not reading.cancelled():
                raise
            line = None
        finally:
            self._interrupt = _ignore
        if line is None and self.interactive:
            self.stdout.write("\n")
        return line

    async def _take(self, line: str) -> bool:
        """Act on one line; False when the chat should end."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/"):
            return await self._command(text)
        return await self._ask(line)

    async def _ask(self, line: str) -> bool:
        """One turn; False when nobody reads our output any more."""
        reply = self._reply()
        incoming = IncomingMessage(
            key=self.key, text=line, user_id=self.conversation, allow_commands=False
        )
        turn = asyncio.ensure_future(self.engine.handle(incoming, reply))
        self._interrupt = turn.cancel
        try:
            with self.modes.answering(), contextlib.suppress(asyncio.CancelledError):
                await turn
        finally:
            self._interrupt = _ignore
            reply.close()
        if reply.failed and not self.interactive:
            self.status = 1
        return not reply.closed

    def _reply(self) -> Reply:
        if self._console is not None:
            return MarkdownReply(self._console, self.stderr)
        return PlainReply(self.stdout, self.stderr, interactive=self.interactive)

    async def _command(self, line: str) -> bool:
        """Run a /command; False when the chat should end."""
        word = line.split()[0].lower()
        if word in EXIT_COMMANDS:
            return False
        if word == "/context":
            self._say(await self._context())
            return True
        if word in RATINGS:
            self._say(await self._rate(RATINGS[word], line[len(word) :].strip()))
            return True
        command = parse_command(line)
        if command is None:
            self.stderr.write(f"Unknown command {word}. Type /help for the commands.\n")
            self.stderr.flush()
        elif command.action == "help":
            problem = f"{command.problem}\n\n" if command.problem else ""
            self._say(problem + TERMINAL_HELP.format(conversation=self.conversation))
        else:
            self._say(await self.engine.run_command(command, self.key))
        return True

    async def _rate(self, value: int, reason: str) -> str:
        """Rate this conversation's last answer (also one from an earlier run)."""
        from core.feedback import Feedback

        feedback = Feedback(self.engine.store, self.engine.metrics)
        reply = await feedback.rate_last(self.key, self.conversation, value, reason or None)
        if reply is None:
            return "There is no answer to rate yet."
        preview = " ".join(reply.content.split())
        if len(preview) > RATED_PREVIEW_CHARS:
            preview = preview[: RATED_PREVIEW_CHARS - 1] + "…"
        noted = ", with your reason" if reason else ""
        return f"Rated the last answer as {VALUE_NAMES[value]}{noted}: “{preview}”"

    async def _context(self) -> str:
        window = await self.engine.context(self.key)
        if window is None:
            return "No messages yet: the next request sends only the system prompt."
        return f"The next request sends your message after {window.describe()}."

    def _say(self, text: str) -> None:
        # Command answers are written for chat platforms' Markdown: backticks read as noise here.
        self.stdout.write(text.replace("`", "") + "\n")
        self.stdout.flush()


def _ignore() -> None:
    """Ctrl-C while a command runs: the command is quick, let it finish."""


def _console(stdout: TextIO) -> Console | None:
    """A rich console when ``stdout`` is a terminal that can redraw, else None (plain text)."""
    if not stdout.isatty():
        return None
    from rich.console import Console

    console = Console(file=stdout)
    if not console.is_terminal or console.is_dumb_terminal:
        return None
    return console


@contextlib.contextmanager
def _on_signal(signum: int, action: Callable[[], object]) -> Iterator[None]:
    """``signum`` runs ``action`` on the loop (stop the answer, leave the prompt)."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signum, action)
    except (NotImplementedError, RuntimeError):  # not the main thread, or not POSIX
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signum)


async def run_chat(
    settings: Settings,
    conversation: str,
    *,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
    stderr: TextIO = sys.stderr,
) -> int:
    """Open the engine and chat until the input ends; returns the exit status."""
    from core.engine import ChatEngine

    engine = await ChatEngine.create(settings)
    try:
        chat = Chat(engine, conversation, stdin=stdin, stdout=stdout, stderr=stderr)
        status = await chat.run()
    finally:
        await engine.close()
    stdout.flush()
    return status


def _tolerant_streams() -> None:
    """Any bytes on stdin decode (undecodable ones become U+FFFD); any text prints."""
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="replace")  # type: ignore[union-attr]


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
    _tolerant_streams()
    settings: Settings | None = None
    try:
        settings = Settings.load()
        # Quiet unless asked: -v or LOG_LEVEL (the answer and the prompt share the terminal).
        configure_logging(settings, verbose=args.verbose, default="CRITICAL")
        name = args.conversation or getpass.getuser()
        return asyncio.run(run_chat(settings, name))
    except ConfigError as error:
        tracebacks = settings is not None and show_tracebacks(settings, verbose=args.verbose)
        report_failure("threadbot", error, with_traceback=tracebacks)
        return 2
    except ThreadbotError as error:
        sys.stderr.write(f"threadbot: {error}\n")
        return 1
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # Output closed while we wrote a prompt or a command's answer: nothing more to say.
        silence(sys.stdout)
        return 0
