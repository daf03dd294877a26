"""Attachments: text files inlined into the stored question; images sent with their turn to a
model that sees them (the real SDKs against the fake model server), with one plain line after
the answer for each reason some were not."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Sequence

import pytest

from core.attachments import (
    MAX_ATTACHMENT_BYTES,
    MAX_ATTACHMENTS_READ,
    Attachment,
    image_type,
    load_images,
    with_text_files,
)
from core.bot import Facts, FrontDoor, PlatformProfile, Route, ThreadLine
from core.commands import HelpStyle
from core.config import Settings
from core.conversation import ConversationKey, ImagePart, IncomingMessage
from core.engine import ChatEngine
from core.models import ModelChoice
from core.providers import build_provider
from core.providers.offline import OfflineProvider
from core.ratelimit import Budgets
from core.reply import CollectingSink
from core.store import ConversationStore
from tests.core.test_front_door import ToyChat, ToySurface, shown
from tests.wire.llm_server import FakeLLMServer, answer, http_error

KEY = ConversationKey("slack", "T1", "C1", "100.000")
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
SEEING = ModelChoice("offline", "scripted", True)
BLIND = ModelChoice("offline", "gpt-3.5-turbo", False)


class Fetches:
    """Attachments whose downloads are counted (or fail)."""

    def __init__(self) -> None:
        self.fetched: list[str] = []

    def file(
        self,
        name: str,
        data: bytes,
        media_type: str = "",
        *,
        size: int | None = None,
        fails: bool = False,
    ) -> Attachment:
        async def fetch() -> bytes:
            self.fetched.append(name)
            if fails:
                raise OSError("connection reset")
            return data

        return Attachment(name, media_type, len(data) if size is None else size, fetch)


# -- text files ------------------------------------------------------------------------------


async def test_text_files_are_inlined_by_media_type_or_suffix() -> None:
    files = Fetches()
    question = await with_text_files(
        "what is wrong here?",
        [
            files.file("notes", b"plain words", "text/plain; charset=utf-8"),
            files.file("main.py", b"print('hi')"),
            files.file("cat.png", PNG, "image/png"),
            files.file("report.pdf", b"%PDF", "application/pdf"),
        ],
    )
    assert question == (
        "what is wrong here?\n\n--- notes ---\nplain words\n\n--- main.py ---\nprint('hi')\n\n"
        "(attachment report.pdf not read: only text files and images are)\n\n"
        "(image attached: cat.png)"
    )
    # Images are fetched with the turn, not at intake.
    assert files.fetched == ["notes", "main.py"]


async def test_text_files_over_the_caps_or_failing_are_noted_not_read() -> None:
    files = Fetches()
    many = [files.file(f"f{n}.txt", b"x") for n in range(MAX_ATTACHMENTS_READ + 1)]
    big = files.file("big.log", b"x", size=MAX_ATTACHMENT_BYTES + 1)
    broken = files.file("broken.md", b"", fails=True)
    question = await with_text_files("", [big, broken, *many])
    assert question.startswith(
        f"(attachment big.log not read: {MAX_ATTACHMENT_BYTES + 1:,} bytes, over the "
        f"{MAX_ATTACHMENT_BYTES:,}-byte limit)\n\n(attachment broken.md could not be downloaded)"
    )
    assert question.endswith(f"(attachment f5.txt not read: at most {MAX_ATTACHMENTS_READ} are)")
    assert "big.log" not in files.fetched


def test_image_types_come_from_the_media_type_or_the_suffix() -> None:
    files = Fetches()
    assert image_type(files.file("a.bin", PNG, "image/webp")) == "image/webp"
    assert image_type(files.file("a.JPG", PNG)) == "image/jpeg"
    assert image_type(files.file("a.gif", PNG, "application/octet-stream")) == "image/gif"
    assert image_type(files.file("a.png", PNG, "text/plain")) is None
    assert image_type(files.file("a.tiff", PNG, "image/tiff")) is None


# -- images: the policy ----------------------------------------------------------------------


async def test_a_model_without_vision_gets_no_image_and_one_note() -> None:
    files = Fetches()
    images, notes = await load_images(
        [files.file("cat.png", PNG, "image/png"), files.file("dog.jpg", PNG)],
        BLIND,
        max_images=4,
        max_bytes=1000,
    )
    assert images == () and files.fetched == []
    assert notes == ["_(cat.png, dog.jpg were not sent: gpt-3.5-turbo cannot see images)_"]


async def test_images_over_the_caps_or_failing_are_noted() -> None:
    files = Fetches()
    images, notes = await load_images(
        [
            files.file("one.png", PNG),
            files.file("huge.png", PNG, size=10_000),
            files.file("liar.png", PNG * 40, size=10),  # bigger than the platform said
            files.file("lost.png", PNG, fails=True),
            files.file("two.webp", PNG),
            files.file("three.gif", PNG),
        ],
        SEEING,
        max_images=2,
        max_bytes=1024,
    )
    assert images == (
        ImagePart("one.png", "image/png", PNG),
        ImagePart("two.webp", "image/webp", PNG),
    )
    assert notes == [
        "_(huge.png, liar.png were not sent: over the 1 KB limit for an image)_",
        "_(three.gif was not sent: at most 2 images go with one message)_",
        "_(lost.png was not sent: it could not be downloaded)_",
    ]
    assert "huge.png" not in files.fetched and "three.gif" not in files.fetched


# -- images through the engine ---------------------------------------------------------------


@pytest.fixture
def vision_settings(settings: Settings) -> Settings:
    return settings.with_overrides(
        models=(SEEING, BLIND), max_images=1, max_image_bytes=5 * 1024 * 1024
    )


async def test_an_image_goes_with_its_turn_only_and_the_note_follows_the_answer(
    vision_settings: Settings, store: ConversationStore, provider: OfflineProvider
) -> None:
    engine = ChatEngine(vision_settings, store, provider)
    files = Fetches()
    attachments = (files.file("cat.png", PNG, "image/png"), files.file("dog.png", PNG))
    provider.enqueue(["A cat."], ["Still a cat."])
    sink = CollectingSink()
    question = "what is this?\n\n(images attached: cat.png, dog.png)"
    result = await engine.handle(
        IncomingMessage(KEY, question, "U1", attachments=attachments), sink
    )
    assert result.status == "answered" and sink.text == "A cat."
    assert sink.note == "_(dog.png was not sent: at most 1 images go with one message)_"
    [sent] = provider.requests[0].messages
    assert sent.content == question and sent.images == (ImagePart("cat.png", "image/png", PNG),)
    # The next turn sends the history without images: they are not stored.
    second = CollectingSink()
    await engine.handle(IncomingMessage(KEY, "and now?", "U1"), second)
    assert all(not m.images for m in provider.requests[1].messages)
    assert second.note is None


async def test_a_blind_model_still_answers_with_a_note(
    vision_settings: Settings, store: ConversationStore, provider: OfflineProvider
) -> None:
    engine = ChatEngine(vision_settings, store, provider)
    await store.update_channel_settings("slack", "T1", "C1", model="gpt-3.5-turbo")
    provider.enqueue(["I cannot see it, but..."])
    sink = CollectingSink()
    files = Fetches()
    incoming = IncomingMessage(KEY, "see?", "U1", attachments=(files.file("cat.png", PNG),))
    result = await engine.handle(incoming, sink)
    assert result.status == "answered" and files.fetched == []
    assert sink.note == "_(cat.png was not sent: gpt-3.5-turbo cannot see images)_"
    assert provider.requests[0].model == "gpt-3.5-turbo"
    assert not provider.requests[0].messages[-1].images


# -- the front door: files of an arrival -----------------------------------------------------


class FileArrival:
    """A toy platform message with files (see tests/core/test_front_door.py)."""

    def __init__(self, chat: ToyChat, text: str, attachments: Sequence[Attachment]) -> None:
        self.chat, self.text = chat, text
        self.attachments = tuple(attachments)
        self.message_id: str | None = str(next(chat.ids))
        self.user_id = "alice"
        self.key = ConversationKey("toy", "home", "general", "t1")
        self.facts = Facts(direct=False, mentioned=True, in_thread=False)

    async def question(self) -> str:
        return self.text

    async def thread(self) -> Sequence[ThreadLine]:
        return []

    async def reply(self, route: Route) -> ToySurface:
        return ToySurface(self.chat, self.key.thread)

    async def may_change_channel(self) -> bool:
        return False


async def test_the_front_door_inlines_text_files_and_sends_images(
    vision_settings: Settings, store: ConversationStore, provider: OfflineProvider
) -> None:
    engine = ChatEngine(vision_settings, store, provider)
    profile = PlatformProfile(name="toy", help=HelpStyle(prefix="!"), command_deadline=1.0)
    door = FrontDoor(engine.settings, engine, profile, budgets=Budgets())
    chat = ToyChat()
    files = Fetches()
    provider.enqueue(["Seen."])
    arrival = FileArrival(
        chat, "look", [files.file("a.txt", b"alpha", "text/plain"), files.file("c.png", PNG)]
    )
    door.receive(arrival)
    await door.drain()
    assert shown(chat, "t1") == "Seen."
    expected = "look\n\n--- a.txt ---\nalpha\n\n(image attached: c.png)"
    [sent] = provider.requests[0].messages
    assert sent.content == expected and [i.name for i in sent.images] == ["c.png"]
    conversation = await store.find(arrival.key)
    assert conversation is not None
    history = await store.history(conversation, limit=None)
    assert [m.content for m in history] == [expected, "Seen."]


# -- images reaching the model server through each SDK ----------------------------------------


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer() as running:
        yield running


@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_an_image_reaches_the_server_as_the_apis_image_part(
    api: str, settings: Settings, store: ConversationStore, server: FakeLLMServer
) -> None:
    model = "gpt-4.1-mini" if api == "openai" else "claude-haiku-4-5"
    wired = Settings.from_mapping(
        {
            "DATABASE_URL": settings.database_url,
            "LLM_PROVIDER": api,
            "OPENAI_API_KEY": "sk-test",
            "ANTHROPIC_API_KEY": "sk-ant-test",
            "OPENAI_BASE_URL": server.openai_base_url,
            "ANTHROPIC_BASE_URL": server.anthropic_base_url,
            "MODELS": f"{api}:{model}:vision",
        }
    )
    engine = ChatEngine(wired, store, build_provider(wired))
    try:
        files = Fetches()
        incoming = IncomingMessage(
            KEY, "what is this?", "U1", attachments=(files.file("cat.png", PNG, "image/png"),)
        )
        sink = CollectingSink()
        assert (await engine.handle(incoming, sink)).status == "answered"
        assert sink.note is None
    finally:
        await engine.close()
    [request] = server.chat_requests()
    content = request.body["messages"][-1]["content"]
    data = base64.b64encode(PNG).decode("ascii")
    if api == "openai":
        assert content == [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
        ]
    else:
        assert content == [
            {
                "type": "image",
                "source": {"type": "base64", "media_type": "image/png", "data": data},
            },
            {"type": "text", "text": "what is this?"},
        ]


@pytest.mark.parametrize(
    ("status", "said"),
    [
        # What a real llama.cpp llama-server without a vision projector answered here.
        (
            500,
            "image input is not supported - hint: if this is unexpected, you may need to "
            "provide the mmproj",
        ),
        (400, "Invalid content type. image_url is only supported by certain models."),
    ],
)
async def test_a_model_that_refuses_images_answers_without_them_and_says_so(
    status: int, said: str, settings: Settings, store: ConversationStore, server: FakeLLMServer
) -> None:
    wired = Settings.from_mapping(
        {
            "DATABASE_URL": settings.database_url,
            "LLM_PROVIDER": "openai",
            "OPENAI_API_KEY": "sk-test",
            "OPENAI_BASE_URL": server.openai_base_url,
            "LLM_MODEL": "smollm2",
            # Listed as seeing images, but the server behind it cannot.
            "MODELS": "openai:smollm2:vision",
        }
    )
    server.enqueue(http_error(status, message=said), answer("A question without its picture."))
    engine = ChatEngine(wired, store, build_provider(wired))
    try:
        files = Fetches()
        incoming = IncomingMessage(
            KEY, "what is this?", "U1", attachments=(files.file("cat.png", PNG, "image/png"),)
        )
        sink = CollectingSink()
        assert (await engine.handle(incoming, sink)).status == "answered"
    finally:
        await engine.close()
    assert sink.text == "A question without its picture."
    assert sink.note == "_(cat.png was not sent: smollm2 refused them: it cannot see images)_"
    first, second = server.chat_requests()
    assert isinstance(first.body["messages"][-1]["content"], list)
    # Asked once more, at once, without the image: not retried as a 5xx.
    assert second.body["messages"][-1]["content"] == "what is this?"
