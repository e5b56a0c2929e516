"""The servers a benchmark runs in their own process: `python -m bench.serve ROLE CONFIG_JSON`.

- `bot`: the whole bot (`app.main.start_bot`), as `python -m app` runs it, on a free port.
- `bare`: the baseline: a bare Bolt `AsyncApp` whose `/deploy` only acks, and a bare webhook
  relay that verifies a Buildkite webhook and sends one `chat.update`, on the same aiohttp stack.
- `bare_mcp`: the baseline of bench.agents: a bare MCP server of the same SDK (its low-level
  `Server` and session manager, Streamable HTTP, stateless with JSON answers, on aiohttp through
  the bot's ASGI bridge, as the bot's /mcp) whose `get_build` returns a constant.
- `fakes`: FakeSlack and FakeBuildkite, for runs whose load generator must not share their loop.
- `buildkite`: FakeBuildkite alone (its build lists are CPU-heavy), driven by control routes.

Each prints one JSON line when ready and runs until its stdin closes (the fakes then print a
summary line of what they served).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import Counter
from typing import Any

from aiohttp import web

from bench.common import BUILDKITE_TOKEN, SIGNING_SECRET, SLACK_TOKEN, WEBHOOK_TOKEN


async def _until_stdin_closes() -> None:
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)


def _ready(**info: Any) -> None:
    print(json.dumps({"pid": os.getpid(), **info}), flush=True)


async def serve_bot(config: dict[str, Any]) -> None:
    from app.main import freeze_heap, start_bot
    from app.ops import logs
    from app.settings import Settings

    settings = Settings(
        slack_bot_token=SLACK_TOKEN,
        slack_signing_secret=SIGNING_SECRET,
        slack_api_url=config["slack_api_url"],
        slack_hooks_url=config["slack_hooks_url"],
        buildkite_api_token=BUILDKITE_TOKEN,
        buildkite_org=config.get("org", "acme"),
        buildkite_api_url=config["bk_url"],
        buildkite_webhook_token=WEBHOOK_TOKEN,
        redis_url=config["redis_url"],
        poll_interval=config.get("poll_interval", 15),
        log_level=config.get("log_level", "INFO"),
        # A benchmark that needs one (agents, in bench.agents) gives its own policy file.
        policy_file=config.get("policy_file", "/nonexistent/policy.yml"),
        _env_file=None,
    )
    logs.configure(settings.log_level, logs.secrets_of(settings))
    async with start_bot(settings, host="127.0.0.1", port=0) as bot:
        freeze_heap()  # as app.main.serve does in production
        _ready(port=bot.port)
        await _until_stdin_closes()


async def serve_bare(config: dict[str, Any]) -> None:
    from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
    from slack_bolt.async_app import AsyncAck, AsyncApp
    from slack_sdk.web.async_client import AsyncWebClient

    from buildkite.webhooks import WebhookVerificationError, verify_webhook

    client = AsyncWebClient(token=SLACK_TOKEN, base_url=config["slack_api_url"])
    bolt = AsyncApp(client=client, signing_secret=SIGNING_SECRET, process_before_response=False)

    @bolt.command("/deploy")
    async def deploy(ack: AsyncAck) -> None:
        await ack()

    #: build id -> (channel, ts) of its message, given by the benchmark.
    targets: dict[str, tuple[str, str]] = {}

    async def slack_events(request: web.Request) -> web.Response:
        return await to_aiohttp_response(await bolt.async_dispatch(await to_bolt_request(request)))

    async def webhook(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            verify_webhook(request.headers, body, WEBHOOK_TOKEN)
        except WebhookVerificationError:
            return web.json_response({"error": "unverified"}, status=401)
        build = json.loads(body)["build"]
        channel, ts = targets[build["id"]]
        await client.chat_update(channel=channel, ts=ts, text=f"{build['state']}")
        return web.json_response({"ok": True})

    async def set_targets(request: web.Request) -> web.Response:
        targets.update({k: (v[0], v[1]) for k, v in (await request.json()).items()})
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/slack/events", slack_events)
    app.router.add_post("/buildkite/webhook", webhook)
    app.router.add_post("/_bench/targets", set_targets)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    _ready(port=runner.addresses[0][1])
    try:
        await _until_stdin_closes()
    finally:
        await runner.cleanup()


#: What the bare MCP server's `get_build` answers: the shape of the bot's, constant.
BARE_BUILD: dict[str, Any] = {
    "build": {
        "pipeline": "svc-0",
        "number": 1,
        "state": "passed",
        "blocked": False,
        "branch": "main",
        "commit": "a" * 40,
        "web_url": "https://buildkite.com/acme/svc-0/builds/1",
        "created_by": None,
    }
}


async def serve_bare_mcp(config: dict[str, Any]) -> None:
    """The SDK's low-level `Server` with one tool answering a constant, behind the SDK's
    session manager (stateless, JSON answers) on aiohttp through the same ASGI bridge as the
    bot's /mcp: what is left of the bot's /mcp without the bot."""
    import mcp_types as types
    from mcp.server import Server, ServerRequestContext
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

    from app.agents.http import serve_asgi

    text = json.dumps(BARE_BUILD)

    async def list_tools(
        ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        schema = {"type": "object", "properties": {}}
        return types.ListToolsResult(
            tools=[types.Tool(name="get_build", description="A constant.", input_schema=schema)]
        )

    async def call_tool(
        ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        return types.CallToolResult(
            content=[types.TextContent(text=text)], structured_content=BARE_BUILD
        )

    server: Server[Any] = Server("bare", on_list_tools=list_tools, on_call_tool=call_tool)
    manager = StreamableHTTPSessionManager(app=server, stateless=True, json_response=True)

    async def mcp(request: web.Request) -> web.StreamResponse:
        return await serve_asgi(manager.handle_request, request, state={})

    app = web.Application()
    app.router.add_route("*", "/mcp", mcp)
    runner = web.AppRunner(app, handle_signals=False)
    async with manager.run():
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        _ready(port=runner.addresses[0][1])
        try:
            await _until_stdin_closes()
        finally:
            await runner.cleanup()


async def serve_fakes(config: dict[str, Any]) -> None:
    from app.simulators.buildkite import FakeBuildkite
    from app.simulators.slack import FakeSlack

    async with (
        FakeSlack() as slack,
        FakeBuildkite(
            token=BUILDKITE_TOKEN, latency=config.get("latency", 0.0), rate_limit=10**9
        ) as bk,
    ):
        for slug in config.get("pipelines", []):
            bk.add_pipeline(slug)
        for index in range(config.get("response_urls", 0)):
            slack.response_url(f"r{index}")
        _ready(
            slack_api_url=slack.api_url,
            slack_hooks_url=slack.hooks_url,
            slack_base=slack.base_url,
            bk_url=bk.url,
        )
        await _until_stdin_closes()
        summary = {
            "builds": len(bk.builds),
            "buildkite_requests": len(bk.requests),
            "buildkite_creates": sum(1 for r in bk.requests if r.method == "POST"),
            "slack_calls": dict(Counter(c.method for c in slack.calls)),
            "slack_responses": len(slack.responses),
            "unexpected": len(slack.unexpected) + len(bk.unexpected),
            "unexpected_sample": (slack.unexpected + bk.unexpected)[:3],
        }
        print(json.dumps(summary), flush=True)


async def serve_buildkite(config: dict[str, Any]) -> None:
    """FakeBuildkite alone, with control routes on a port of their own (the fake's own server
    answers every path as the API): move a build to a state and get its webhook body, and list
    the builds."""
    from app.simulators.buildkite import FakeBuildkite

    async with FakeBuildkite(token=BUILDKITE_TOKEN, rate_limit=10**9) as bk:
        for slug in config.get("pipelines", []):
            bk.add_pipeline(slug)

        async def payload(request: web.Request) -> web.Response:
            body = await request.json()
            if body.get("state"):
                bk.set_build_state(body["slug"], body["number"], body["state"])
            return web.json_response(bk.webhook_payload(body["slug"], body["number"]))

        async def builds(request: web.Request) -> web.Response:
            listing = [
                {
                    "id": b["id"],
                    "slug": b["pipeline"]["slug"],
                    "number": b["number"],
                    "bytes": len(json.dumps(b)),
                }
                for b in bk.builds
            ]
            return web.json_response(listing)

        control = web.Application()
        control.router.add_post("/payload", payload)
        control.router.add_get("/builds", builds)
        runner = web.AppRunner(control, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        _ready(bk_url=bk.url, control=f"http://127.0.0.1:{port}")
        try:
            await _until_stdin_closes()
        finally:
            await runner.cleanup()
        summary = {"requests": len(bk.requests), "unexpected": bk.unexpected[:3]}
        print(json.dumps(summary), flush=True)


ROLES = {
    "bot": serve_bot,
    "bare": serve_bare,
    "bare_mcp": serve_bare_mcp,
    "fakes": serve_fakes,
    "buildkite": serve_buildkite,
}


def main() -> None:
    role, config = sys.argv[1], json.loads(sys.argv[2])
    asyncio.run(ROLES[role](config))


if __name__ == "__main__":
    main()
