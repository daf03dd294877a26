"""The Slack adapter: Bolt app, SlackReply surface, HTTP or Socket Mode entry point."""
