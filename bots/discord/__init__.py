"""The Discord adapter: discord.py client, app commands and the DiscordReply surface."""
