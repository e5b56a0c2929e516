"""How any text from a person or from Buildkite is put into Slack mrkdwn: escaped, and linked
only to the hosts the bot trusts. The renderers in app.slack.render (and the parsers, to quote
back what was typed) call these.

Slack reads `<…>` as a link, a mention (`<@U…>`, `<!channel>`) or a date, and `&` as the start
of an entity; escaping `&`, `<` and `>` makes all of them show as the text that was typed.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from buildkite.webhooks import BUILDKITE_WEB_HOST, buildkite_hosts

#: Buildkite's web host: a link to any other host (but the configured API's) is shown as text.
_extra_hosts: set[str] = set()

#: After a backtick, so that a run of them in someone's text cannot end a preformatted block.
_ZWSP = "\u200b"
_BACKTICK_RUN = re.compile(r"`(?=`)")


def escape(text: str) -> str:
    """Escape the three characters Slack's mrkdwn treats as control characters."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def person(user_id: str) -> str:
    """Who acted, as a message names them: a Slack mention, or an agent by its name (an agent's
    id, `agent:<name>`, is no Slack user id and must not be written as a mention)."""
    if user_id.startswith("agent:"):
        return f"agent {code(user_id.removeprefix('agent:'))}"
    return f"<@{user_id}>"


def plain(text: str) -> str:
    """Someone's free text (a reason, a build message) to show as it is: escaped, and with its
    runs of backticks broken up, so that it cannot open a code block over the bot's own text."""
    return _BACKTICK_RUN.sub("`" + _ZWSP, escape(text))


def code(text: str) -> str:
    """`text` as an inline code span that its own backticks cannot end early."""
    return "`" + escape(text).replace("`", "'") + "`"


def typed(value: str, limit: int = 60) -> str:
    """What someone typed, cut short and escaped, to quote back inside backticks."""
    value = value.replace("`", "'")
    return escape(value if len(value) <= limit else value[: limit - 1] + "…")


def preformatted(text: str) -> str:
    """`text` fit to go inside a ``` block of the bot's: escaped, and its backticks broken up."""
    return escape(text).replace("`", "`" + _ZWSP)


def trust_web_host(api_url: str) -> None:
    """Trust the web host of a configured Buildkite API (`api.example.com` → `example.com`),
    derived as the webhook checks derive it (`buildkite_hosts`), so both agree."""
    web_hosts, _ = buildkite_hosts(api_url)
    _extra_hosts.update(h for h in web_hosts if not _on_host(h, BUILDKITE_WEB_HOST))


def _on_host(host: str, allowed: str) -> bool:
    return host == allowed or host.endswith("." + allowed)


def trusted_url(url: str | None, *, hosts: tuple[str, ...] = ()) -> str | None:
    """`url` if it is https on Buildkite's web host (or a subdomain, or `hosts`), else None.

    A URL that would break out of `<url|label>` (`|`, `>`, `<`, spaces, control characters) is
    never trusted, whatever its host.
    """
    if not url or any(c in url for c in "|<> \"'") or any(ord(c) < 0x21 for c in url):
        return None
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        return None
    if parts.scheme != "https" or parts.username or parts.password or port not in (None, 443):
        return None
    allowed = (BUILDKITE_WEB_HOST, *_extra_hosts, *hosts)
    return url if any(_on_host(host, a) for a in allowed) else None


def link(url: str | None, label: str, *, hosts: tuple[str, ...] = ()) -> str:
    """`<url|label>` when the URL is trusted (see `trusted_url`), else the label as text.

    The label is escaped, and a `|` in it (which would end the URL part early) is replaced.
    """
    text = escape(label).replace("|", "¦")
    target = trusted_url(url, hosts=hosts)
    return f"<{target}|{text}>" if target else text
