"""The fake Slack's Web API methods, each answering as Slack does. Part of the sandbox's and the
tests' simulator of Slack.
"""

from __future__ import annotations

import functools
import json
import uuid

from app.simulators.slack_records import (
    MAX_BLOCKS_JSON,
    PERMALINK_BASE,
    Handler,
    Json,
    _ApiError,
    _public,
    block_problems,
)
from app.simulators.slack_state import SlackState


class SlackWebApi(SlackState):
    """The fake's workspace, answered over Slack's Web API."""

    @functools.cached_property
    def _methods(self) -> dict[str, Handler]:
        return {
            "auth.test": self._auth_test,
            "apps.connections.open": self._apps_connections_open,
            "chat.postMessage": self._chat_post_message,
            "chat.update": self._chat_update,
            "chat.postEphemeral": self._chat_post_ephemeral,
            "chat.getPermalink": self._chat_get_permalink,
            "chat.unfurl": self._chat_unfurl,
            "users.info": self._users_info,
            "users.lookupByEmail": self._users_lookup_by_email,
            "conversations.info": self._conversations_info,
            "conversations.history": self._conversations_history,
            "conversations.replies": self._conversations_replies,
            "conversations.open": self._conversations_open,
            "usergroups.users.list": self._usergroups_users_list,
            "views.open": self._views_open,
            "views.update": self._views_update,
            "views.publish": self._views_publish,
        }

    # ------------------------------------------------------------------ Web API methods

    def _auth_test(self, args: Json) -> Json:
        return {
            "ok": True,
            "url": "https://fake-workspace.slack.com/",
            "team": "Fake Workspace",
            "user": "chatops",
            "team_id": self.team_id,
            "user_id": self.bot_user_id,
            "bot_id": self.bot_id,
            "app_id": self.app_id,
            "is_enterprise_install": False,
        }

    def _apps_connections_open(self, args: Json) -> Json:
        ticket = uuid.uuid4().hex
        self._tickets.add(ticket)
        ws_base = self.base_url.replace("http://", "ws://", 1)
        return {"ok": True, "url": f"{ws_base}/socket-mode/{ticket}"}

    def _chat_post_message(self, args: Json) -> Json:
        channel = self._channel_arg(args)
        self._check_can_post(channel)
        text, blocks = self._content_args(args, required=True)
        thread_ts = args.get("thread_ts") or None
        message = self._store_message(
            channel,
            text or "",
            blocks or [],
            thread_ts=str(thread_ts) if thread_ts else None,
            reply_broadcast=bool(args.get("reply_broadcast")),
            metadata=args.get("metadata"),
            attachments=args.get("attachments"),
        )
        return {"ok": True, "channel": channel, "ts": message["ts"], "message": _public(message)}

    def _chat_update(self, args: Json) -> Json:
        channel = self._channel_arg(args)
        ts = str(args.get("ts") or "")
        message = self.messages.get(channel, {}).get(ts)
        if message is None:
            if ts in self.ephemeral_messages.get(channel, {}):
                # Slack keeps no copy of an ephemeral message: only its response_url edits it.
                raise _ApiError(
                    "message_not_found", unexpected=f"chat.update of ephemeral message {ts}"
                )
            raise _ApiError("message_not_found")
        if not any(k in args for k in ("text", "blocks", "attachments")):
            raise _ApiError("no_text")
        text, blocks = self._content_args(args, required=False)
        if "text" in args:
            message["text"] = text or ""
        if "blocks" in args:
            message["blocks"] = blocks or []
        if "attachments" in args:
            message["attachments"] = args["attachments"]
        if "metadata" in args:
            message["metadata"] = args["metadata"]
        message["edited"] = {"user": self.bot_user_id, "ts": self._next_ts()}
        return {
            "ok": True,
            "channel": channel,
            "ts": ts,
            "text": message["text"],
            "message": _public(message),
        }

    def _chat_post_ephemeral(self, args: Json) -> Json:
        channel = self._channel_arg(args)
        if not args.get("user"):
            raise _ApiError("user_not_in_channel")
        self._check_can_post(channel)
        text, blocks = self._content_args(args, required=True)
        message = self._store_ephemeral(channel, str(args["user"]), text or "", blocks or [])
        return {"ok": True, "message_ts": message["ts"]}

    def _chat_get_permalink(self, args: Json) -> Json:
        channel = self._channel_arg(args)
        ts = str(args.get("message_ts") or "")
        message = self.messages.get(channel, {}).get(ts)
        if message is None:
            raise _ApiError("message_not_found")
        link = f"{PERMALINK_BASE}/{channel}/p{ts.replace('.', '')}"
        thread_ts = message.get("thread_ts")
        if thread_ts and thread_ts != ts:
            link += f"?thread_ts={thread_ts}&cid={channel}"
        return {"ok": True, "channel": channel, "permalink": link}

    def _chat_unfurl(self, args: Json) -> Json:
        """As Slack: `unfurls` for links of one shared message, named by `channel` and `ts`
        together or by `unfurl_id` and `source` together; each link must be in that message."""
        if "links:write" not in self.scopes:
            raise _ApiError("missing_scope")
        unfurls = args.get("unfurls")
        if not unfurls:
            raise _ApiError("missing_unfurls", unexpected="chat.unfurl without unfurls")
        if not isinstance(unfurls, dict):
            raise _ApiError("invalid_unfurls", unexpected=f"unfurls is not a map: {unfurls!r}")
        named = {k for k in ("unfurl_id", "source", "channel", "ts") if args.get(k)}
        by_id = named == {"unfurl_id", "source"}
        by_message = named == {"channel", "ts"}
        if not (by_id or by_message):
            raise _ApiError(
                "invalid_arguments",
                unexpected="chat.unfurl needs channel and ts, or unfurl_id and source: "
                f"{sorted(named)}",
            )
        if by_id:
            shared = self.shared_links.get(str(args.get("unfurl_id") or ""))
            if shared is None or shared["source"] != args.get("source"):
                raise _ApiError("cannot_unfurl_url", unexpected="unknown unfurl_id or source")
        else:
            shared = next(
                (
                    s
                    for s in self.shared_links.values()
                    if s["channel"] == args.get("channel") and s["message_ts"] == args.get("ts")
                ),
                None,
            )
            if shared is None:
                known = self.messages.get(str(args.get("channel")), {}).get(str(args.get("ts")))
                raise _ApiError(
                    "cannot_unfurl_message" if known else "cannot_find_message",
                    unexpected="chat.unfurl of a message with no shared links",
                )
        shared_urls = {link["url"] for link in shared["links"]}
        for url, unfurl in unfurls.items():
            if url not in shared_urls:
                raise _ApiError("cannot_unfurl_url", unexpected=f"{url} was not shared there")
            if not isinstance(unfurl, dict) or not (unfurl.get("blocks") or unfurl.get("text")):
                raise _ApiError("invalid_unfurls", unexpected=f"empty unfurl for {url}")
            problems = block_problems(list(unfurl.get("blocks") or []), max_blocks=50)
            if problems:
                raise _ApiError("invalid_blocks", unexpected="; ".join(problems))
        shared.setdefault("unfurls", {}).update(unfurls)
        return {"ok": True}

    def _users_info(self, args: Json) -> Json:
        """As Slack: users:read to read a person at all, users:read.email for their email."""
        if "users:read" not in self.scopes:
            raise _ApiError("missing_scope")
        user = self.users.get(str(args.get("user") or ""))
        if user is None:
            raise _ApiError("user_not_found")
        if "users:read.email" not in self.scopes:
            profile = {k: v for k, v in user["profile"].items() if k != "email"}
            user = {**user, "profile": profile}
        return {"ok": True, "user": user}

    def _require_history(self, channel: str) -> None:
        """As Slack: reading a conversation needs the history scope of its kind."""
        info = self.channels.get(channel) or {}
        if channel.startswith("D"):
            needed = "im:history"
        elif info.get("is_private"):
            needed = "groups:history"
        else:
            needed = "channels:history"
        if needed not in self.scopes:
            raise _ApiError("missing_scope")

    def _users_lookup_by_email(self, args: Json) -> Json:
        if not {"users:read", "users:read.email"} <= self.scopes:
            raise _ApiError("missing_scope")
        email = str(args.get("email") or "").lower()
        for user in self.users.values():
            if email and str(user["profile"].get("email", "")).lower() == email:
                return {"ok": True, "user": user}
        raise _ApiError("users_not_found")

    def _conversations_info(self, args: Json) -> Json:
        channel = self.channels.get(str(args.get("channel") or ""))
        if channel is None:
            raise _ApiError("channel_not_found")
        return {"ok": True, "channel": channel}

    def _conversations_history(self, args: Json) -> Json:
        """Top-level messages (and thread broadcasts), newest first, paged by cursor."""
        channel = self._channel_arg(args)
        self._require_history(channel)
        if channel not in self.channels and channel not in self.messages:
            raise _ApiError("channel_not_found")
        found = [m for m in self.history(channel) if self._in_window(m, args)]
        return self._page(list(reversed(found)), args)

    def _conversations_replies(self, args: Json) -> Json:
        """A thread: its parent first, then the replies oldest first, paged by cursor."""
        channel = self._channel_arg(args)
        self._require_history(channel)
        ts = str(args.get("ts") or "")
        parent = self.messages.get(channel, {}).get(ts)
        if parent is None:
            raise _ApiError("thread_not_found")
        root = str(parent.get("thread_ts") or ts)
        replies = [m for m in self.thread(channel, root) if self._in_window(m, args)]
        return self._page([self.messages[channel][root], *replies], args)

    @staticmethod
    def _in_window(message: Json, args: Json) -> bool:
        ts = float(message["ts"])
        inclusive = bool(args.get("inclusive"))
        oldest = float(args.get("oldest") or "-inf")
        latest = float(args.get("latest") or "inf")
        if inclusive:
            return oldest <= ts <= latest
        return oldest < ts < latest

    @staticmethod
    def _page(found: list[Json], args: Json) -> Json:
        limit = min(int(args.get("limit") or 100), 999)
        start = int(str(args.get("cursor") or "0").removeprefix("page:") or 0)
        page = found[start : start + limit]
        with_metadata = bool(args.get("include_all_metadata"))
        shown = [
            {k: v for k, v in _public(m).items() if with_metadata or k != "metadata"} for m in page
        ]
        more = start + limit < len(found)
        return {
            "ok": True,
            "messages": shown,
            "has_more": more,
            "response_metadata": {"next_cursor": f"page:{start + limit}" if more else ""},
        }

    def _conversations_open(self, args: Json) -> Json:
        """A DM with one person (the only kind the bot opens): the same D id every time."""
        if "im:write" not in self.scopes:
            raise _ApiError("missing_scope")
        if args.get("channel"):
            raise _ApiError("invalid_arguments", unexpected="conversations.open by channel")
        users = [u for u in str(args.get("users") or "").split(",") if u]
        if not users:
            raise _ApiError("users_list_not_supplied")
        if len(users) > 1:
            raise _ApiError("invalid_arguments", unexpected=f"a group DM with {users}")
        if users[0] not in self.users:
            raise _ApiError("user_not_found")
        channel = "D" + users[0].removeprefix("U")
        self.messages.setdefault(channel, {})
        return {"ok": True, "channel": {"id": channel}}

    def _usergroups_users_list(self, args: Json) -> Json:
        users = self.usergroups.get(str(args.get("usergroup") or ""))
        if users is None:
            raise _ApiError("no_such_subteam")
        return {"ok": True, "users": list(users)}

    def _views_open(self, args: Json) -> Json:
        trigger_id = str(args.get("trigger_id") or "")
        if not trigger_id:
            raise _ApiError("invalid_trigger_id")
        if trigger_id in self._used_triggers:
            raise _ApiError("exchanged_trigger_id")
        self._used_triggers.add(trigger_id)
        view_args = self._view_arg(args)
        view = self._stored_view(
            view_args, f"V{next(self._ids):08d}", app_installed_team_id=self.team_id
        )
        self.views[view["id"]] = view
        return {"ok": True, "view": view}

    def _views_update(self, args: Json) -> Json:
        view_id = str(args.get("view_id") or "")
        external_id = str(args.get("external_id") or "")
        current = self.views.get(view_id) if view_id else None
        if current is None and external_id:
            current = next(
                (v for v in self.views.values() if v.get("external_id") == external_id), None
            )
        if current is None:
            raise _ApiError("not_found")
        if args.get("hash") and args["hash"] != current["hash"]:
            raise _ApiError("hash_conflict")
        view_args = self._view_arg(args)
        keep: Json = {
            k: current[k]
            for k in ("id", "team_id", "state", "root_view_id", "app_id", "bot_id")
            if k in current
        }
        current.clear()
        current.update({"private_metadata": "", "callback_id": "", "external_id": ""})
        current.update(view_args)
        current.update(keep)
        current["hash"] = self._next_ts() + ".fake"
        return {"ok": True, "view": current}

    def _views_publish(self, args: Json) -> Json:
        """A person's Home tab: `not_enabled` unless the app has one (manifest: App Home)."""
        if not self.home_tab_enabled:
            raise _ApiError("not_enabled", unexpected="views.publish with the Home tab off")
        user_id = str(args.get("user_id") or "")
        if not user_id:
            raise _ApiError("invalid_arguments", unexpected="views.publish without user_id")
        if user_id not in self.users:
            raise _ApiError("invalid_arguments", unexpected=f"views.publish to unknown {user_id}")
        view = args.get("view")
        if not isinstance(view, dict) or view.get("type") != "home":
            raise _ApiError("invalid_arguments", unexpected=f"not a home view: {view!r}")
        if len(json.dumps(view)) > 250_000:
            raise _ApiError("view_too_large")
        view_args = self._view_arg(args)
        current = self.home_views.get(user_id)
        if args.get("hash") and (current is None or args["hash"] != current["hash"]):
            raise _ApiError("hash_conflict")
        published = self._stored_view(
            view_args, current["id"] if current else f"V{next(self._ids):08d}"
        )
        self.home_views[user_id] = published
        return {"ok": True, "view": published}

    # ------------------------------------------------------------------ method helpers

    def _channel_arg(self, args: Json) -> str:
        channel = str(args.get("channel") or "")
        if channel.startswith("#"):
            named = next((c for c in self.channels.values() if c["name"] == channel[1:]), None)
            if named is None:
                raise _ApiError("channel_not_found")
            return str(named["id"])
        if not channel:
            raise _ApiError("channel_not_found")
        return channel

    def _check_can_post(self, channel: str) -> None:
        """Answer as Slack does when the bot may not post in `channel`."""
        info = self.channels.get(channel)
        if info is None or info.get("is_member") or channel.startswith("D"):
            return
        if info.get("is_private"):
            raise _ApiError("channel_not_found")  # private channels are hidden from non-members
        if "chat:write.public" not in self.scopes:
            raise _ApiError("not_in_channel")

    def _content_args(self, args: Json, *, required: bool) -> tuple[str | None, list[Json] | None]:
        text = args.get("text")
        blocks = args.get("blocks")
        if blocks is not None:
            if not isinstance(blocks, list):
                raise _ApiError("invalid_blocks", unexpected=f"blocks is not a list: {blocks!r}")
            problems = block_problems(blocks, max_blocks=50)
            if problems:
                raise _ApiError("invalid_blocks", unexpected="; ".join(problems))
            size = len(json.dumps(blocks, ensure_ascii=False))
            if size > MAX_BLOCKS_JSON:
                raise _ApiError(
                    "msg_blocks_too_long", unexpected=f"blocks of {size:,} characters in all"
                )
        if required and not (text or blocks or args.get("attachments")):
            raise _ApiError("no_text")
        return (None if text is None else str(text)), blocks

    def _stored_view(self, view_args: Json, view_id: str, **extra: str) -> Json:
        """A view as Slack keeps and returns it: what the app sent, and Slack's own fields."""
        view = {
            **view_args,
            "id": view_id,
            "team_id": self.team_id,
            "state": {"values": {}},
            "hash": self._next_ts() + ".fake",
            "root_view_id": view_id,
            "previous_view_id": None,
            "app_id": self.app_id,
            "bot_id": self.bot_id,
            **extra,
        }
        view.setdefault("private_metadata", "")
        view.setdefault("callback_id", "")
        view.setdefault("external_id", "")
        return view

    def _view_arg(self, args: Json) -> Json:
        view = args.get("view")
        if not isinstance(view, dict) or view.get("type") not in ("modal", "home"):
            raise _ApiError("invalid_arguments", unexpected=f"not a view: {view!r}")
        problems = block_problems(view.get("blocks", []), max_blocks=100)
        title = view.get("title", {}).get("text", "")
        if len(title) > 24:
            problems.append(f"modal title longer than 24 chars: {title!r}")
        if len(view.get("private_metadata", "")) > 3000:
            problems.append("private_metadata longer than 3000 chars")
        if problems:
            raise _ApiError("invalid_arguments", unexpected="; ".join(problems))
        return dict(view)
