"""Answers by response_url, only to Slack: the one way every response_url post goes out.

A response_url is a bearer credential that Slack hands out under `https://hooks.slack.com/`
(SLACK_HOOKS_URL). One outside that prefix is never posted to, whoever sent it: the answer goes by
`chat.postEphemeral` to the person in their channel instead, or, with nobody to show it to, is
logged once (without the URL) and dropped.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
from slack_bolt.context.respond.async_respond import AsyncRespond
from slack_sdk.webhook import WebhookResponse

from app.ops.metrics import Metrics
from app.slack.outbox import Outbox, SlackDeliveryError
from app.slack.render.common import Rendered

log = logging.getLogger(__name__)


class SlackHooks:
    """Where answers by response_url may go (under `prefix`), and the fallback when not there."""

    def __init__(self, prefix: str, outbox: Outbox, metrics: Metrics) -> None:
        self.prefix = prefix
        self.outbox = outbox
        self.metrics = metrics

    def allows(self, url: str | None) -> bool:
        """Whether `url` is a response_url the bot may post to: one under SLACK_HOOKS_URL."""
        # The prefix ends with "/", so its host cannot be extended (`hooks.slack.com.evil`).
        return isinstance(url, str) and url.startswith(self.prefix)

    def respond(
        self, response_url: str | None, *, channel: str | None, user: str | None
    ) -> GuardedRespond:
        """Bolt's `respond` for one request, answering `user` in `channel`."""
        return GuardedRespond(self, response_url, channel=channel, user=user)

    def respond_for(self, context: Mapping[str, Any]) -> GuardedRespond:
        """The `respond` of the Bolt request whose context this is."""
        return self.respond(
            context.get("response_url"),
            channel=context.get("channel_id"),
            user=context.get("user_id"),
        )


class GuardedRespond(AsyncRespond):
    """Bolt's `respond`, posting only to a response_url under SLACK_HOOKS_URL."""

    def __init__(
        self, hooks: SlackHooks, response_url: str | None, *, channel: str | None, user: str | None
    ) -> None:
        super().__init__(response_url=response_url)
        self.hooks = hooks
        self.channel = channel
        self.user = user
        self._warned = False

    async def __call__(  # type: ignore[override]  # None: answered another way
        self,
        text: str | dict[str, Any] = "",
        blocks: Sequence[Any] | None = None,
        attachments: Sequence[Any] | None = None,
        response_type: str | None = None,
        replace_original: bool | None = None,
        delete_original: bool | None = None,
        unfurl_links: bool | None = None,
        unfurl_media: bool | None = None,
        thread_ts: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> WebhookResponse | None:
        if self.response_url is None or self.hooks.allows(self.response_url):
            return await self._post(
                text, blocks, attachments, response_type, replace_original, delete_original,
                unfurl_links, unfurl_media, thread_ts, metadata,
            )  # fmt: skip
        message: dict[str, Any] = (
            text if isinstance(text, dict) else {"text": text, "blocks": blocks}
        )
        await self._instead(str(message.get("text") or ""), list(message.get("blocks") or []))
        return None

    async def _post(self, *args: Any) -> WebhookResponse:
        counted = self.hooks.metrics.slack_calls
        try:
            response = await super().__call__(*args)
        except (aiohttp.ClientError, TimeoutError):
            counted.labels("response_url", "connection_error").inc()
            raise
        status = response.status_code
        counted.labels("response_url", "ok" if status == 200 else f"http_{status}").inc()
        return response

    async def _instead(self, text: str, blocks: list[dict[str, Any]]) -> None:
        """Answer without the response_url: ephemerally in the channel, or not at all."""
        if not (self.channel and self.user and (text or blocks)):
            self._warn_once("answer not sent")
            return
        self._warn_once("answered by chat.postEphemeral instead")
        # A failure is logged by the outbox; the person's request itself is unaffected.
        with contextlib.suppress(SlackDeliveryError):
            await self.hooks.outbox.ephemeral(self.channel, self.user, Rendered(text, blocks))

    def _warn_once(self, outcome: str) -> None:
        if not self._warned:
            self._warned = True
            # Never the URL itself: it may be a live credential for some other service.
            log.warning("response_url is outside SLACK_HOOKS_URL: %s", outcome)
