"""The Slack wire fakes: a Web API server for slack_sdk (with Socket Mode), and senders of
signed requests (HTTP) and envelopes (Socket Mode)."""

from .sender import Answer, SlackSender
from .server import Call, FakeSlack, Limit, Message, RawAnswer, StatusCall, StoredFile, Team
from .socket_mode import SocketModeSender, SocketModeSlack

__all__ = [
    "Answer",
    "Call",
    "FakeSlack",
    "Limit",
    "Message",
    "RawAnswer",
    "SlackSender",
    "SocketModeSender",
    "SocketModeSlack",
    "StatusCall",
    "StoredFile",
    "Team",
]
