"""Build links pasted in Slack: unfurled as a live build card (`link_shared` -> chat.unfurl), and
followed in a message's thread on request (the "Follow this build" message shortcut)."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from redis.exceptions import RedisError

from app.core.commands import BuildRef
from app.core.errors import UserError
from app.core.listings import Listings
from app.core.names import is_pipeline_slug
from app.core.policy import Action, Policy
from app.core.services import Services, request_id_for
from app.core.thread_commands import build_links, message_texts
from app.slack.actor import Actor
from app.slack.directory import Directory
from app.slack.ids import ActionId
from app.slack.outbox import Outbox, SlackDeliveryError
from app.slack.render import threads
from app.slack.render.texts import TRACKING_DOWN, already_asked
from app.slack.render.unfurl import CARD_ACTIONS, unfurl
from app.storage.inbox import SharedUnfurl
from app.storage.keys import REQUEST_TTL
from app.storage.records import TrackedBuild, Transition
from app.storage.store import Store
from buildkite.errors import BuildkiteError, NotFound
from buildkite.models import Build

log = logging.getLogger(__name__)

#: At most this many builds of one message are unfurled, and as many Buildkite requests made.
MAX_UNFURLS = 3
#: A build page's path, and nothing after it but a slash (a query or fragment is fine).
_BUILD_PATH = re.compile(
    r"/(?P<org>[A-Za-z0-9][A-Za-z0-9_-]{0,99})/(?P<pipeline>[^/]+)/builds/(?P<number>[1-9][0-9]{0,8})/?"
)


def shared_build(url: str, org: str) -> BuildRef | None:
    """The build a shared link is the page of: https on buildkite.com itself (no userinfo, no
    port), a path that is exactly `/<org>/<pipeline>/builds/<n>`, `org` the configured one.

    Strict, because the card is shown as the link's own preview: a link elsewhere that merely
    contains a build URL (`https://buildkite.com/other/x/builds/1?u=https://buildkite.com/...`)
    or a lookalike host is not unfurled.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if (
        parts.scheme != "https"
        or parts.hostname != "buildkite.com"
        or parts.netloc.lower() != "buildkite.com"
        or port is not None
    ):
        return None
    match = _BUILD_PATH.fullmatch(parts.path)
    if match is None or match.group("org") != org or not is_pipeline_slug(match["pipeline"]):
        return None
    return BuildRef(match["pipeline"], int(match["number"]))


#: The policy action each card button needs.
BUTTON_ACTIONS = {
    ActionId.CANCEL: Action.CANCEL,
    ActionId.REBUILD: Action.REBUILD,
    ActionId.RETRY_FAILED: Action.REBUILD,
}


@dataclass(frozen=True)
class SharedLinks:
    """A `link_shared` event: who shared which links where, and how chat.unfurl names them."""

    user: str
    channel: str
    message_ts: str | None
    unfurl_id: str | None
    source: str | None
    urls: Sequence[str]

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> SharedLinks | None:
        user, channel = event.get("user"), event.get("channel")
        links = event.get("links")
        if not isinstance(user, str) or not isinstance(channel, str) or not isinstance(links, list):
            return None
        urls = [
            str(link["url"])
            for link in links[:20]
            if isinstance(link, dict) and isinstance(link.get("url"), str)
        ]

        def text(key: str) -> str | None:
            value = event.get(key)
            return value if isinstance(value, str) and value else None

        return cls(
            user=user,
            channel=channel,
            message_ts=text("message_ts"),
            unfurl_id=text("unfurl_id"),
            source=text("source"),
            urls=urls,
        )


async def allowed_buttons(
    policy: Policy, directory: Directory, pipeline: str, user: str, channel: str
) -> list[ActionId]:
    """The card's buttons the sharer may use there (each click is checked again for whoever
    clicks it)."""
    allowed = []
    for button in CARD_ACTIONS:
        decision = await policy.check(
            BUTTON_ACTIONS[button],
            pipeline,
            user=user,
            channel_id=channel,
            channel_name=None,
            resolve=directory.usergroup_members,
        )
        if decision.allowed:
            allowed.append(button)
    return allowed


class LiveUnfurls:
    """Unfurls a followed build's card again where its link was shared, on each state change
    (until it is final), so that a pasted link shows the build as it is."""

    def __init__(
        self, *, store: Store, outbox: Outbox, policy: Policy, directory: Directory
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.policy = policy
        self.directory = directory

    async def on_change(
        self, tracked: TrackedBuild, build: Build, transition: Transition | None = None
    ) -> None:
        for shared in await self.store.unfurls_of(tracked.build_id):
            buttons = await allowed_buttons(
                self.policy, self.directory, tracked.pipeline, shared.user, shared.channel
            )
            card = unfurl(tracked.pipeline, build, buttons=buttons)
            try:
                await self.outbox.unfurl(
                    {shared.url: card},
                    channel=shared.channel,
                    ts=shared.ts,
                    unfurl_id=shared.unfurl_id,
                    source=shared.source,
                )
            except SlackDeliveryError as exc:
                if not exc.permanent:
                    raise
                await self.store.forget_unfurl(tracked.build_id, shared)  # the message is gone
                continue
            if build.is_final:
                await self.store.forget_unfurl(tracked.build_id, shared)


class Unfurls:
    """Build cards for shared links, and following a linked build in a thread."""

    def __init__(self, services: Services) -> None:
        self.s = services

    async def cards(self, shared: SharedLinks) -> dict[str, dict[str, Any]]:
        """url -> its card, for the configured organisation's build links only.

        A build the bot follows is drawn from its record in Redis (no Buildkite request); any
        other costs one request. A link to a build that does not exist is left alone. At most
        MAX_UNFURLS builds are looked at per message (found or not), so a message of many links
        costs at most that many Buildkite requests; two links to one build cost one.
        """
        org = self.s.settings.buildkite_org
        cards: dict[str, dict[str, Any]] = {}
        seen: dict[BuildRef, Build | None] = {}
        for url in shared.urls:
            ref = shared_build(url, org)
            if ref is None:
                continue
            if ref not in seen:
                if len(seen) >= MAX_UNFURLS:
                    continue
                seen[ref] = await self._build(ref, shared, url)
            build = seen[ref]
            if build is None:
                continue
            buttons = await allowed_buttons(
                self.s.policy, self.s.directory, ref.pipeline, shared.user, shared.channel
            )
            cards[url] = unfurl(ref.pipeline, build, buttons=buttons)
        return cards

    async def _build(self, ref: BuildRef, shared: SharedLinks, url: str) -> Build | None:
        """The build, from its record when the bot follows it (and then its card is unfurled
        again as it moves on), else from Buildkite."""
        try:
            tracked = await self.s.store.find(ref.pipeline, ref.number)
        except RedisError:
            tracked = None
        if tracked is not None and tracked.snapshot:
            try:
                build = Build.model_validate(tracked.snapshot)
            except ValueError:
                log.warning("the record of %s #%s is not a build", ref.pipeline, ref.number)
            else:
                if shared.source != "composer" and not build.is_final:
                    with contextlib.suppress(RedisError):
                        await self.s.store.remember_unfurl(
                            tracked.build_id,
                            SharedUnfurl(
                                url=url,
                                channel=shared.channel,
                                user=shared.user,
                                ts=shared.message_ts,
                                unfurl_id=shared.unfurl_id,
                                source=shared.source,
                            ),
                        )
                return build
        try:
            return await self.s.buildkite.get_build(ref.pipeline, ref.number)
        except NotFound:
            return None
        except BuildkiteError as exc:
            log.warning("could not read %s #%s to unfurl it: %s", ref.pipeline, ref.number, exc)
            return None

    async def follow(
        self, message: Mapping[str, Any], actor: Actor, *, trigger: str
    ) -> tuple[str, Build]:
        """Follow the build linked in `message` with a build message in its thread; returns the
        build and its pipeline.

        Raises UserError when the message links no build of the organisation, the build cannot
        be read, or the bot already follows it in this channel.
        """
        refs = build_links(message_texts(dict(message)), self.s.settings.buildkite_org)
        if not refs:
            raise UserError(threads.NO_BUILD_LINK)
        ref = refs[0]
        key = request_id_for("follow", trigger)
        try:
            first = await self.s.store.claim_request(key, actor.user_id, ttl=REQUEST_TTL)
        except RedisError:
            raise UserError(TRACKING_DOWN) from None
        if first is not None:
            raise UserError(already_asked(first, actor.user_id))
        try:
            build = await Listings(self.s).build(ref, action="follow")
        except UserError:
            await self._forget(key)  # asked again, it is tried again
            raise
        thread_ts = str(message.get("thread_ts") or message.get("ts") or "") or None
        try:
            new = await self.s.tracker.track(
                build,
                pipeline=ref.pipeline,
                channel=actor.channel_id,
                requester=None,
                thread_ts=thread_ts,
                # Told through it if the bot may not post there (not invited to the channel).
                notify_url=actor.response_url,
            )
        except RedisError:
            await self._forget(key)
            raise UserError(TRACKING_DOWN) from None
        if not new:
            raise UserError(threads.already_followed(ref.pipeline, build))
        return ref.pipeline, build

    async def _forget(self, key: str) -> None:
        # Nothing was followed: the same person may try again at once.
        with contextlib.suppress(RedisError):
            await self.s.store.release_request(key)
