"""``METRICS_PORT`` on the real Discord process: ``GET /metrics`` counts its turns and calls."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bots.metrics_http import METRICS_PATH
from tests.discord.test_discord_process import bot_process, demo_text, fake_discord
from tests.wire.slack.harness import free_port


async def test_metrics_port_serves_the_discord_process_figures(tmp_path: Path) -> None:
    question = "What do you measure?"
    port = free_port()
    async with fake_discord() as fake, aiohttp.ClientSession() as session:
        async with bot_process(fake, tmp_path, METRICS_PORT=str(port)) as bot:
            message = await fake.send_message(fake.text_channel, question)
            thread = int(message["id"])
            await bot.until(
                "the answer in the thread",
                lambda: [m.content for m in fake.bot_messages_in(thread)] == [demo_text(question)],
            )
            await bot.until(
                "the turn's log line", lambda: any(": answered" in line for line in bot.stderr)
            )
            async with session.get(f"http://127.0.0.1:{port}{METRICS_PATH}") as response:
                assert response.status == 200
                text = await response.text()
            assert await bot.terminate() == 0
        bot.assert_quiet()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    discord = ("threadbot_platform", "discord")
    assert samples[("threadbot_turns_total", (("threadbot_outcome", "answered"), discord))] == 1
    assert samples[("threadbot_reply_final_text_seconds_count", (discord,))] == 1
    posts = samples[("threadbot_platform_calls_total", (("threadbot_call", "post"), discord))]
    assert posts >= 1
    model = (
        ("error_type", ""),
        ("gen_ai_operation_name", "chat"),
        ("gen_ai_provider_name", "offline"),
        ("gen_ai_request_model", "scripted"),
    )
    assert samples[("gen_ai_client_operation_duration_seconds_count", model)] == 1
