"""Metrics and logs of the real Slack process (``python -m bots.slack``): ``GET /metrics`` after
an answered turn (with a provider 429 and a Slack 429 on the way) and a failed one, JSON log
lines, and the same figures with a span per turn over OTLP/HTTP to a receiver on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Callable

import aiohttp
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families

from bots.metrics_http import METRICS_PATH
from tests.slack.test_slack_process import CHANNEL, BotProcess, http_env, signed_sender
from tests.wire.llm_server import FakeLLMServer, answer, rate_limited, server_error
from tests.wire.slack import FakeSlack
from tests.wire.slack.harness import free_port, until

ANSWER = "Metrics are figures over time."
#: Tokens the LLM fake reports for the answer.
INPUT_TOKENS, OUTPUT_TOKENS = 42, 7
MODEL = "gpt-metrics"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(session: aiohttp.ClientSession, url: str) -> Samples:
    """Every sample of a ``/metrics`` page, keyed by name and labels."""
    async with session.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample ``name`` with exactly ``labels`` (0 when it was never recorded)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


MODEL_LABELS = {
    "gen_ai_operation_name": "chat",
    "gen_ai_provider_name": "openai",
    "gen_ai_request_model": MODEL,
}


async def test_metrics_and_json_logs_after_an_answer_a_429_and_a_failure(
    bot_process: Callable[..., BotProcess],
) -> None:
    async with FakeSlack() as slack, FakeLLMServer() as llm, aiohttp.ClientSession() as session:
        bot = bot_process(
            **http_env(
                slack,
                OPENAI_BASE_URL=llm.openai_base_url,
                OPENAI_API_KEY="test",
                LLM_MODEL=MODEL,
                MAX_RETRY_ATTEMPTS="2",
                SLACK_STREAMING="update",
                LOG_FORMAT="json",
            )
        )
        await bot.healthy(session)
        # The model says 429 once, then answers; Slack says 429 to the first chat.update.
        llm.enqueue(
            rate_limited(0),
            answer(ANSWER, input_tokens=INPUT_TOKENS, output_tokens=OUTPUT_TOKENS),
            server_error(500),
            server_error(502),
        )
        slack.fail_next("chat.update", "ratelimited", status=429)
        # No thread status (an app without it): the reply shows "Thinking…" and is edited.
        slack.missing_scopes.add("assistant.threads.setStatus")
        sender = signed_sender(bot, slack, session)
        answered = slack.next_ts()
        await sender.mention("what are metrics?", ts=answered)
        await until(lambda: slack.thread_text(CHANNEL, answered) == ANSWER, within=60)
        failed = slack.next_ts()
        await sender.mention("and now?", ts=failed)
        # The turn's log line is written once its reply has ended.
        await until(lambda: '"outcome": "failed"' in bot.stderr, within=60)
        assert slack.bot_messages(CHANNEL, failed)

        samples = await scrape(session, bot.base_url + METRICS_PATH)
        turns = "threadbot_turns_total"
        assert value(samples, turns, threadbot_platform="slack", threadbot_outcome="answered") == 1
        assert value(samples, turns, threadbot_platform="slack", threadbot_outcome="failed") == 1
        retries = "threadbot_provider_retries_total"
        assert value(samples, retries, threadbot_cause="rate_limit") == 1
        assert value(samples, retries, threadbot_cause="server_error") == 1
        # Four model calls: the 429, the answer, two 5xx; one succeeded.
        duration = "gen_ai_client_operation_duration_seconds_count"
        assert value(samples, duration, **MODEL_LABELS, error_type="") == 1
        failures = sum(
            v for (name, labels), v in samples.items()
            if name == duration and ("error_type", "") not in labels
        )  # fmt: skip
        assert failures == 3
        assert (
            value(samples, "gen_ai_server_time_to_first_token_seconds_count", **MODEL_LABELS) == 1
        )
        usage = "gen_ai_client_token_usage_sum"
        assert value(samples, usage, **MODEL_LABELS, gen_ai_token_type="input") == INPUT_TOKENS
        assert value(samples, usage, **MODEL_LABELS, gen_ai_token_type="output") == OUTPUT_TOKENS
        # Every platform call the streamer made, counted by kind, as the fake Slack saw them.
        calls = "threadbot_platform_calls_total"
        assert (
            value(samples, calls, threadbot_platform="slack", threadbot_call="edit")
            == (slack.counts["chat.update"])
        )
        assert (
            value(samples, calls, threadbot_platform="slack", threadbot_call="post")
            == (slack.counts["chat.postMessage"])
        )
        limited = "threadbot_platform_rate_limited_total"
        assert value(samples, limited, threadbot_scope="slack:chat.update") == 1
        # Only the answered turn showed answer text; both turns took their place in line.
        slack_label = {"threadbot_platform": "slack"}
        assert value(samples, "threadbot_reply_first_text_seconds_count", **slack_label) == 1
        assert value(samples, "threadbot_reply_final_text_seconds_count", **slack_label) == 1
        assert value(samples, "threadbot_turn_queued_seconds_count", **slack_label) == 2
        # No label carries an id: channels, users, messages, teams stay out.
        for _name, labels in samples:
            for _, label_value in labels:
                assert CHANNEL not in label_value and slack.team.team_id not in label_value

        assert await bot.terminate() == 0
        lines = [json.loads(line) for line in bot.stderr.splitlines() if line.strip()]
        turns_logged = {line["turn"]["outcome"]: line["turn"] for line in lines if "turn" in line}
        ok = turns_logged["answered"]
        assert ok["platform"] == "slack" and CHANNEL in ok["conversation"]
        assert ok["input_tokens"] == INPUT_TOKENS and ok["output_tokens"] == OUTPUT_TOKENS
        assert 0 <= ok["first_text_ms"] <= ok["final_text_ms"]
        assert {"queued_ms", "model_ms", "first_token_ms"} <= ok.keys()
        assert turns_logged["failed"]["conversation_id"] != ok["conversation_id"]
        assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)


class OtlpReceiver:
    """A tiny OTLP/HTTP receiver on 127.0.0.1 that keeps the protobuf requests posted to it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.traces: list[ExportTraceServiceRequest] = []
        self.metrics: list[ExportMetricsServiceRequest] = []
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> OtlpReceiver:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/v1/metrics", self._metrics)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _traces(self, request: web.Request) -> web.Response:
        self.traces.append(ExportTraceServiceRequest.FromString(await request.read()))
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def _metrics(self, request: web.Request) -> web.Response:
        self.metrics.append(ExportMetricsServiceRequest.FromString(await request.read()))
        return web.Response(body=b"", content_type="application/x-protobuf")

    def span_names(self) -> list[str]:
        return [
            span.name
            for request in self.traces
            for resource in request.resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
        ]

    def metric_names(self) -> set[str]:
        return {
            metric.name
            for request in self.metrics
            for resource in request.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
        }


async def test_otlp_endpoint_gets_a_turn_span_and_the_metrics(
    bot_process: Callable[..., BotProcess],
) -> None:
    async with FakeSlack() as slack, OtlpReceiver() as otlp, aiohttp.ClientSession() as session:
        bot = bot_process(
            **http_env(slack, OFFLINE_DELAY="0", OTEL_EXPORTER_OTLP_ENDPOINT=otlp.url + "/")
        )
        await bot.healthy(session)
        ts = slack.next_ts()
        await signed_sender(bot, slack, session).mention("hello over otlp", ts=ts)
        await until(lambda: ": answered" in bot.stderr, within=60)
        # The exporters flush at shutdown.
        assert await bot.terminate() == 0
        assert "threadbot.turn" in otlp.span_names(), bot.stderr
        names = otlp.metric_names()
        assert {"gen_ai.client.operation.duration", "threadbot.turns"} <= names, names
        assert "threadbot.reply.final_text.duration" in names
