"""The Buildkite client as the operator's settings make it, in one place for both composition
roots: the bot (app.main) and `python -m app ledger rebuild` (app.ledger_cli)."""

from __future__ import annotations

import functools

import httpx

from app.settings import Settings
from buildkite.client import BuildkiteClient, StartLookup

#: httpx's own verified TLS context, made once per process: loading the CA bundle costs a
#: tenth of a second of CPU, which every bot start (and every test's) would otherwise pay.
tls_context = functools.cache(httpx.create_ssl_context)


def buildkite_http(settings: Settings) -> httpx.AsyncClient:
    """The pooled HTTP client for Buildkite's API (verified TLS, BUILDKITE_TIMEOUT)."""
    return httpx.AsyncClient(
        verify=tls_context(),
        timeout=httpx.Timeout(settings.buildkite_timeout),
        limits=httpx.Limits(max_connections=20, max_keepalive_connections=10),
    )


def create_buildkite_client(settings: Settings, http: httpx.AsyncClient) -> BuildkiteClient:
    """The Buildkite client over `http` (see `buildkite_http`), for BUILDKITE_ORG."""
    return BuildkiteClient(
        settings.buildkite_api_token,
        settings.buildkite_org,
        base_url=str(settings.buildkite_api_url),
        http=http,
        timeout=settings.buildkite_timeout,
        start_lookup=StartLookup(patience=settings.buildkite_start_patience),
    )
