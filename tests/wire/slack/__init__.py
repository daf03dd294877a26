"""The Slack wire fakes: a Web API server for slack_sdk, and a sender of signed requests."""

from .sender import Answer, SlackSender
from .server import Call, FakeSlack, Limit, Message, Team

__all__ = ["Answer", "Call", "FakeSlack", "Limit", "Message", "SlackSender", "Team"]
