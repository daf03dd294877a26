"""A local imitation of Discord (REST API and gateway) that the real discord.py talks to."""
