"""REDIS_URL: the one reader of every form the bot accepts, and the masking of its secrets.

`parse_redis_url` refuses a URL the bot could not use with a reason that quotes no part of the
URL (a password written without percent-encoding can end up anywhere in it); `mask_url` hides
every password in any string that looks like one of these URLs, and never raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS

SERVER_SCHEMES = ("redis://", "rediss://", "unix://")
SENTINEL_SCHEME = "redis+sentinel://"
CLUSTER_SCHEME = "redis+cluster://"
SCHEMES = (*SERVER_SCHEMES, SENTINEL_SCHEME, CLUSTER_SCHEME)
SENTINEL_PORT = 26379
REDIS_PORT = 6379

#: Query options of a single-server URL, as redis-py reads them (`redis.asyncio.from_url`).
#: redis-py passes any other name on to its connection class, which fails at the first command.
SERVER_OPTIONS = frozenset(
    {
        "db",
        "username",
        "password",
        "client_name",
        "protocol",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "retry_on_timeout",
        "health_check_interval",
    }
)
TLS_OPTIONS = frozenset(
    {
        "ssl_keyfile",
        "ssl_certfile",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_ca_path",
        "ssl_check_hostname",
        "ssl_min_version",
        "ssl_ciphers",
        "ssl_password",
    }
)
SENTINEL_OPTIONS = frozenset({"sentinel_password"})
CLUSTER_OPTIONS = frozenset({"username", "password"})

_PERCENT_HINT = "; a password with @ : / ? # % or , in it must be percent-encoded"


@dataclass(frozen=True)
class RedisTarget:
    """What a REDIS_URL names: one server (kept as the URL, for redis-py), the sentinels of a
    service, or the nodes of a cluster; with the credentials the URL carries."""

    kind: Literal["server", "sentinel", "cluster"]
    url: str
    hosts: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)


def parse_redis_url(url: str) -> RedisTarget:
    """Read a REDIS_URL, or raise ValueError saying what is wrong without quoting the URL."""
    if url.startswith(SENTINEL_SCHEME):
        return _parse_multi_host(url, "sentinel")
    if url.startswith(CLUSTER_SCHEME):
        return _parse_multi_host(url, "cluster")
    if url.startswith(SERVER_SCHEMES):
        return _parse_server(url)
    raise ValueError(
        "must be a redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// URL"
    )


def _parse_server(url: str) -> RedisTarget:
    try:
        parts = urlsplit(url)
    except ValueError:  # an unbalanced [ or ] around a host
        raise ValueError(f"the host cannot be read{_PERCENT_HINT}") from None
    if "," in parts.netloc.rpartition("@")[2]:
        raise ValueError(
            "several hosts are only possible with redis+sentinel:// or redis+cluster://"
        )
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"the port must be a number from 1 to 65535{_PERCENT_HINT}") from None
    if port == 0:
        raise ValueError("the port must be a number from 1 to 65535")
    options = _options(
        parts.query, SERVER_OPTIONS | (TLS_OPTIONS if parts.scheme == "rediss" else set())
    )
    if parts.scheme == "unix":
        if not parts.path.strip("/"):
            raise ValueError("a unix:// URL needs the socket's path, e.g. unix:///run/redis.sock")
        db = _db(options.get("db", "0"))
    else:
        if parts.path not in ("", "/") and not re.fullmatch(r"/[0-9]+", parts.path):
            raise ValueError(f"the path must be the database number, e.g. /0{_PERCENT_HINT}")
        db = _db(options.get("db", parts.path.strip("/") or "0"))
    for name, value in options.items():
        parser = URL_QUERY_ARGUMENT_PARSERS.get(name)
        try:
            if parser is not None:
                parser(value)
        except (TypeError, ValueError):
            raise ValueError(f"the {name} option has an invalid value") from None
    return RedisTarget(
        kind="server",
        url=url,
        db=db,
        username=_userinfo(parts.netloc)[0] or options.get("username"),
        password=_userinfo(parts.netloc)[1] or options.get("password"),
    )


def _parse_multi_host(url: str, kind: Literal["sentinel", "cluster"]) -> RedisTarget:
    scheme = SENTINEL_SCHEME if kind == "sentinel" else CLUSTER_SCHEME
    rest = url.removeprefix(scheme)
    rest, _, query = rest.partition("?")
    rest = rest.partition("#")[0]
    username = password = None
    if "@" in rest:
        credentials, rest = rest.rsplit("@", 1)
        if ":" in credentials:
            user, _, secret = credentials.partition(":")
            username, password = unquote(user) or None, unquote(secret)
        elif kind == "sentinel":
            password = unquote(credentials)  # the documented `redis+sentinel://password@…`
        else:
            username = unquote(credentials)
    hosts_text, _, path = rest.partition("/")
    default_port = SENTINEL_PORT if kind == "sentinel" else REDIS_PORT
    hosts = tuple(_host(item, default_port) for item in hosts_text.split(","))
    segments = [segment for segment in path.split("/") if segment]
    options = _options(query, SENTINEL_OPTIONS if kind == "sentinel" else CLUSTER_OPTIONS)
    service = None
    if kind == "sentinel":
        if not segments or len(segments) > 2:
            raise ValueError(
                "expected redis+sentinel://[:password@]host:26379[,host:26379…]/service-name[/db]"
            )
        service = unquote(segments[0])
        db = _db(segments[1] if len(segments) > 1 else "0")
    else:
        if len(segments) > 1:
            raise ValueError("expected redis+cluster://[:password@]host:6379[,host:6379…]")
        db = _db(segments[0] if segments else "0")
        if db != 0:
            raise ValueError("a Redis cluster has only database 0")
    return RedisTarget(
        kind=kind,
        url=url,
        hosts=hosts,
        service=service,
        db=db,
        username=username or options.get("username"),
        password=password or options.get("password"),
        sentinel_password=options.get("sentinel_password"),
    )


def _host(item: str, default_port: int) -> tuple[str, int]:
    """`host`, `host:port` or `[v6 address]:port`, one of several."""
    item = item.strip()
    if item.startswith("["):
        name, bracket, port = item[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            raise ValueError("an IPv6 address must be written [address]:port")
        port = port.removeprefix(":")
    else:
        name, _, port = item.partition(":")
    if not name:
        raise ValueError("every host must be named: one of them is empty (two commas, or :port)")
    if not port:
        return name, default_port
    if not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"every port must be a number from 1 to 65535{_PERCENT_HINT}")
    return name, int(port)


def _options(query: str, known: frozenset[str] | set[str]) -> dict[str, str]:
    """The query's options (the first value of each), refusing any the bot cannot use."""
    try:
        values = parse_qs(query, strict_parsing=False)
    except ValueError:
        raise ValueError("the query string cannot be read") from None
    unknown = sorted(set(values) - known)
    if unknown:
        # An option's name is quoted only where it cannot be a piece of a password (a password
        # with an unencoded `?` puts the rest of itself, then `@host`, into the query).
        named = f" `{unknown[0]}`" if "@" not in query and unknown[0].isidentifier() else ""
        raise ValueError(f"unknown option{named} (known: {', '.join(sorted(known))})")
    return {name: value[0] for name, value in values.items()}


def _db(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise ValueError("the database must be a number (0, 1, …)")
    return int(text)


def _userinfo(netloc: str) -> tuple[str | None, str | None]:
    """(username, password) as redis-py reads them from a URL's netloc."""
    if "@" not in netloc:
        return None, None
    credentials = netloc.rpartition("@")[0]
    user, colon, secret = credentials.partition(":")
    return (unquote(user) or None), (unquote(secret) if colon else None)


# -- masking ------------------------------------------------------------------------------------

_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_QUERY_SECRET = re.compile(r"([?&;][^=&#?;]*password[^=&#?;]*=)[^&#;]*", re.IGNORECASE)
#: A Redis URL inside any text (a log line, an exception message), up to the next blank or quote.
REDIS_URL_IN_TEXT = re.compile(r"(?:rediss?|unix|redis\+sentinel|redis\+cluster)://[^\s\"'<>`]+")


def mask_url(url: str) -> str:
    """The URL with every password (userinfo, `?password=`, `?sentinel_password=`, …) replaced
    by `***`, fit to print or log. Never raises, whatever the text.

    Everything up to the last `@` counts as credentials, so a password with an unencoded `@`,
    `/`, `?` or `#` is hidden too; only a username before a `:` stays readable.
    """
    scheme = _URL_SCHEME.match(url)
    start = scheme.end() if scheme else 0
    credentials, at, rest = url[start:].rpartition("@")
    # The credentials go first and whole: a query-like piece of an unencoded password must not
    # be taken for the query.
    rest = _QUERY_SECRET.sub(r"\1***", rest)
    if at:
        user, colon, _ = credentials.partition(":")
        shown = f"{user}:" if colon and not re.search(r"[/?#]", user) else ""
        rest = f"{shown}***@{rest}"
    return url[:start] + rest


def mask_redis_urls(text: str) -> str:
    """`text` with every Redis URL in it masked (see `mask_url`)."""
    if "://" not in text:
        return text
    return REDIS_URL_IN_TEXT.sub(lambda match: mask_url(match.group(0)), text)


def url_secrets(url: str | None) -> list[str]:
    """Every password a REDIS_URL carries, decoded and as written, for the log redaction.

    Read generously: a URL that `parse_redis_url` would refuse still has its secrets found.
    """
    if not url:
        return []
    found: set[str] = set()
    scheme = _URL_SCHEME.match(url)
    rest = url[scheme.end() :] if scheme else url
    credentials, at, _ = rest.rpartition("@")
    if ":" in credentials:
        secret = credentials.partition(":")[2]
        found |= {secret, unquote(secret)}
    elif at and url.startswith(SENTINEL_SCHEME):
        found |= {credentials, unquote(credentials)}  # `redis+sentinel://password@…`
    if at:
        # As redis-py reads it, when an unencoded `/`, `?` or `#` cut the netloc short.
        with_colon = re.split(r"[/?#]", credentials, maxsplit=1)[0]
        if ":" in with_colon:
            part = with_colon.partition(":")[2]
            found |= {part, unquote(part)}
    for match in re.finditer(r"[?&;][^=&#?;]*password[^=&#?;]*=([^&#;]*)", url, re.IGNORECASE):
        found |= {match.group(1), unquote(match.group(1))}
    return sorted(secret for secret in found if secret)
