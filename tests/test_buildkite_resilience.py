"""BuildkiteClient when things go wrong: error mapping, 429 waits, retries, lost creates,
pagination limits and path injection. Against the fake over loopback, except a few pure
backoff/redaction unit tests on ``httpx.MockTransport``.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from app.core.errors import explain
from app.simulators.buildkite import FakeBuildkite
from buildkite.client import REQUEST_ID_META_KEY, BuildkiteClient, StartLookup
from buildkite.errors import (
    AuthenticationError,
    BadRequest,
    BuildkiteAPIError,
    BuildkiteError,
    BuildkiteUnavailable,
    BuildMaybeStarted,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServerError,
    UnexpectedResponse,
    ValidationFailed,
)

PIPE = "/v2/organizations/acme/pipelines/deploy-prod"
SECRET = "bk-secret-token-0123456789"


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
async def bk() -> AsyncIterator[FakeBuildkite]:
    async with FakeBuildkite(token=SECRET) as fake:
        fake.add_pipeline("deploy-prod")
        yield fake
        assert fake.unexpected == []


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def make_client(bk: FakeBuildkite, sleeps: Sleeps) -> Callable[..., BuildkiteClient]:
    def make(**options: Any) -> BuildkiteClient:
        options.setdefault("token", SECRET)
        return BuildkiteClient(org="acme", base_url=bk.url, sleep=sleeps, **options)

    return make


@pytest.fixture
async def client(make_client: Callable[..., BuildkiteClient]) -> AsyncIterator[BuildkiteClient]:
    async with make_client() as bk_client:
        yield bk_client


def told(error: BuildkiteError, number: int | None = None) -> str:
    """What a person is told of `error` (by the one explainer), asking about deploy-prod."""
    return explain(error, action="deploy", pipeline="deploy-prod", number=number)


def assert_no_secret(error: BaseException) -> None:
    for text in (str(error), repr(error), str(error.args)):
        assert SECRET not in text
    if isinstance(error, BuildkiteError):
        assert SECRET not in told(error)


def calls(bk: FakeBuildkite) -> list[str]:
    return [f"{request.method} {request.api_path}" for request in bk.requests]


# Error mapping


async def test_401_is_an_authentication_error(
    bk: FakeBuildkite, make_client: Callable[..., BuildkiteClient]
) -> None:
    async with make_client(token="not-the-token") as bk_client:
        with pytest.raises(AuthenticationError) as caught:
            await bk_client.get_pipeline("deploy-prod")

    error = caught.value
    assert error.status == 401
    assert str(error) == (
        "Buildkite returned 401 for GET /organizations/acme/pipelines/deploy-prod: "
        "Authentication required. Please supply a valid API Access Token: "
        "https://buildkite.com/docs/apis/rest-api#authentication"
    )
    assert "not-the-token" not in str(error) + repr(error)
    assert told(error) == (
        "Could not deploy `deploy-prod`: Buildkite rejected the bot's API token (401). "
        "An admin should check BUILDKITE_API_TOKEN."
    )
    assert len(bk.requests) == 1


async def test_403_names_the_missing_scope_and_a_create_is_not_retried(
    bk: FakeBuildkite, client: BuildkiteClient
) -> None:
    bk.scopes.remove("write_builds")

    with pytest.raises(PermissionDenied) as caught:
        await client.create_build("deploy-prod", commit="HEAD", branch="main")

    assert caught.value.missing_scope == "write_builds"
    assert told(caught.value) == (
        "Could not deploy `deploy-prod`: the bot's Buildkite API token lacks the `write_builds` "
        "scope. An admin can add it to the token in Buildkite's API Access Tokens settings."
    )
    assert calls(bk) == ["POST /organizations/acme/pipelines/deploy-prod/builds"]
    assert bk.builds == []


async def test_404_says_what_was_not_found(bk: FakeBuildkite, client: BuildkiteClient) -> None:
    with pytest.raises(NotFound) as caught:
        await client.get_build("deploy-prod", 7)

    assert str(caught.value) == (
        "Buildkite returned 404 for GET /organizations/acme/pipelines/deploy-prod/builds/7: "
        "Not Found"
    )
    assert told(caught.value, 7) == "Build #7 of pipeline `deploy-prod` was not found."
    assert len(bk.requests) == 1  # a 4xx is never retried


async def test_422_keeps_the_field_errors_and_is_not_retried(
    bk: FakeBuildkite, client: BuildkiteClient
) -> None:
    with pytest.raises(ValidationFailed) as caught:
        await client.create_build("deploy-prod", commit="", branch="main")

    error = caught.value
    assert (error.status, error.message) == (422, "Validation Failed")
    assert error.errors == [{"field": "commit", "code": "missing"}]
    assert str(error).endswith(": Validation Failed (commit missing)")
    assert told(error) == (
        "Buildkite refused to deploy `deploy-prod`: Validation Failed (commit missing)."
    )
    assert len(bk.requests) == 1
    assert bk.builds == []


async def test_400_is_a_bad_request(bk: FakeBuildkite, client: BuildkiteClient) -> None:
    job_id = bk.add_build("deploy-prod", state="passed")["jobs"][0]["id"]

    with pytest.raises(BadRequest) as caught:
        await client.retry_job("deploy-prod", 1, job_id)

    assert caught.value.status == 400
    assert told(caught.value) == (
        "Buildkite refused to deploy `deploy-prod`: Only failed, timed out or canceled jobs can "
        "be retried."
    )


async def test_5xx_on_get_is_retried_with_backoff_then_raised(
    bk: FakeBuildkite, make_client: Callable[..., BuildkiteClient], sleeps: Sleeps
) -> None:
    bk.add_build("deploy-prod")
    bk.fail_next(10, status=502)

    async with make_client(max_retries=2, backoff_base=0.5) as bk_client:
        with pytest.raises(ServerError) as caught:
            await bk_client.get_build("deploy-prod", 1)

    assert caught.value.status == 502
    assert calls(bk) == ["GET /organizations/acme/pipelines/deploy-prod/builds/1"] * 3
    first, second = sleeps.calls
    assert 0.5 <= first <= 1.0
    assert 1.0 <= second <= 1.5
    assert told(caught.value) == (
        "Could not deploy `deploy-prod`: Buildkite is not answering right now. "
        "Please try again in a minute."
    )


async def test_5xx_then_success(bk: FakeBuildkite, client: BuildkiteClient, sleeps: Sleeps) -> None:
    bk.add_build("deploy-prod")
    bk.fail_next(2, status=503, path_contains="/builds/1")

    build = await client.get_build("deploy-prod", 1)

    assert build.number == 1
    assert len(bk.requests) == 3
    assert len(sleeps.calls) == 2


async def test_a_non_json_error_body_is_tolerated(
    bk: FakeBuildkite, make_client: Callable[..., BuildkiteClient]
) -> None:
    bk.fail_next(1, status=503, body="<html><body>upstream connect error</body></html>")

    async with make_client(max_retries=0) as bk_client:
        with pytest.raises(ServerError) as caught:
            await bk_client.get_user()

    assert caught.value.message == "Service Unavailable"
    assert caught.value.errors == []


async def test_a_patch_of_settings_is_retried_on_5xx(
    bk: FakeBuildkite, client: BuildkiteClient
) -> None:
    bk.fail_next(1, status=500, method="PATCH")

    await client.update_pipeline("deploy-prod", description="x")

    assert [request.method for request in bk.requests] == ["PATCH", "PATCH"]


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
async def test_an_action_answered_5xx_is_not_sent_again(
    bk: FakeBuildkite, client: BuildkiteClient, method: str
) -> None:
    # A proxy's 5xx may come after Buildkite did it: a second cancel would be refused (422),
    # a second delete answered 404.
    bk.add_build("deploy-prod", state="running")
    bk.fail_next(1, status=500, method=method)
    action: dict[str, Callable[[], Awaitable[object]]] = {
        "PUT": lambda: client.cancel_build("deploy-prod", 1),
        "DELETE": lambda: client.delete_pipeline("deploy-prod"),
    }

    with pytest.raises(ServerError):
        await action[method]()

    assert [request.method for request in bk.requests] == [method]


async def test_create_pipeline_is_never_retried(bk: FakeBuildkite, client: BuildkiteClient) -> None:
    bk.fail_next(1, status=500, method="POST")

    with pytest.raises(ServerError):
        await client.create_pipeline(name="Docs", repository="git@x:y.git", configuration="")

    assert calls(bk) == ["POST /organizations/acme/pipelines"]


async def test_timeouts_are_retried(
    bk: FakeBuildkite, make_client: Callable[..., BuildkiteClient], sleeps: Sleeps
) -> None:
    bk.delay_next(1, 30.0, path_contains="/user")

    async with make_client(timeout=0.2) as bk_client:
        user = await bk_client.get_user()

    assert user.name == "ChatOps Bot"
    assert calls(bk) == ["GET /user", "GET /user"]
    assert len(sleeps.calls) == 1


async def test_timeouts_end_in_buildkite_unavailable(
    bk: FakeBuildkite, make_client: Callable[..., BuildkiteClient]
) -> None:
    bk.delay_next(5, 30.0)

    async with make_client(timeout=0.1, max_retries=1) as bk_client:
        with pytest.raises(BuildkiteUnavailable) as caught:
            await bk_client.get_user()

    error = caught.value
    assert (error.method, error.path, error.attempts) == ("GET", "/user", 2)
    assert str(error).startswith("Buildkite could not be reached for GET /user after 2 attempts")
    assert "ReadTimeout" in str(error)
    assert told(error) == (
        "Could not deploy `deploy-prod`: Buildkite is not answering right now. "
        "Please try again in a minute."
    )
    assert_no_secret(error)


async def test_connection_refused_is_buildkite_unavailable(sleeps: Sleeps) -> None:
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}/v2"

    async with BuildkiteClient(SECRET, "acme", base_url=base_url, sleep=sleeps) as bk_client:
        with pytest.raises(BuildkiteUnavailable) as caught:
            await bk_client.get_organization()

    assert caught.value.attempts == 4
    assert caught.value.path == "/organizations/acme"
    assert len(sleeps.calls) == 3
    assert_no_secret(caught.value)


# Rate limits


async def test_429_waits_rate_limit_reset_plus_jitter(
    bk: FakeBuildkite, client: BuildkiteClient, sleeps: Sleeps
) -> None:
    bk.rate_limit_next(1, reset=3)

    user = await client.get_user()

    assert user.name == "ChatOps Bot"
    [waited] = sleeps.calls
    assert 3.5 <= waited <= 4.5
    assert len(bk.requests) == 2


async def test_429_gives_up_past_max_rate_limit_wait(
    bk: FakeBuildkite, make_client: Callable[..., BuildkiteClient], sleeps: Sleeps
) -> None:
    bk.rate_limit_next(10, reset=3)

    async with make_client(max_rate_limit_wait=6) as bk_client:
        with pytest.raises(RateLimited) as caught:
            await bk_client.get_user()

    error = caught.value
    assert (error.status, error.reset) == (429, 3.0)
    assert error.message.startswith("You have exceeded your API rate limit")
    assert len(sleeps.calls) == 1  # a second wait would pass 6 s in total
    assert len(bk.requests) == 2
    assert told(error) == (
        "Could not deploy `deploy-prod`: the Buildkite API rate limit is used up. "
        "Please try again in about 3 s."
    )
    assert_no_secret(error)


async def test_one_429_wait_is_capped_at_a_minute(
    bk: FakeBuildkite, make_client: Callable[..., BuildkiteClient], sleeps: Sleeps
) -> None:
    bk.rate_limit_next(1, reset=3600)

    async with make_client(max_rate_limit_wait=120) as bk_client:
        await bk_client.get_user()

    [waited] = sleeps.calls
    assert 60.5 <= waited <= 61.5


async def test_the_fakes_own_window_limits_and_reports(sleeps: Sleeps) -> None:
    async with FakeBuildkite(token=SECRET, rate_limit=2) as fake:
        async with BuildkiteClient(
            SECRET, "acme", base_url=fake.url, sleep=sleeps, max_rate_limit_wait=0
        ) as bk_client:
            await bk_client.get_user()
            assert bk_client.rate_limit_remaining == 1
            await bk_client.get_user()
            assert bk_client.rate_limit_remaining == 0
            with pytest.raises(RateLimited) as caught:
                await bk_client.get_user()
        assert caught.value.reset is not None and 0 < caught.value.reset <= 60
        assert fake.unexpected == []


async def test_a_create_answered_429_is_sent_again(
    bk: FakeBuildkite, client: BuildkiteClient
) -> None:
    bk.rate_limit_next(1, reset=1, path_contains="/builds")

    build = await client.create_build("deploy-prod", commit="HEAD", branch="main")

    assert build.number == 1
    assert calls(bk) == [f"POST {PIPE.removeprefix('/v2')}/builds"] * 2
    assert len(bk.builds) == 1


# Creating a build at most once


@pytest.mark.parametrize("how", ["cut", "delay"])
async def test_a_create_whose_response_is_lost_makes_one_build(
    bk: FakeBuildkite, make_client: Callable[..., BuildkiteClient], how: str
) -> None:
    bk.drop_after_create_next(1, how=how)  # type: ignore[arg-type]

    async with make_client(timeout=0.3) as bk_client:
        build = await bk_client.create_build(
            "deploy-prod", commit="HEAD", branch="main", request_id="req-42"
        )

    assert build.number == 1
    assert build.meta_data[REQUEST_ID_META_KEY] == "req-42"
    assert len(bk.builds) == 1
    post, lookup = bk.requests
    assert (post.method, lookup.method) == ("POST", "GET")
    assert lookup.path == f"{PIPE}/builds"
    assert lookup.params("meta_data[chatops_request_id]") == ["req-42"]


async def test_a_create_answered_5xx_is_looked_for_never_sent_again(
    bk: FakeBuildkite, make_client: Callable[..., BuildkiteClient], sleeps: Sleeps
) -> None:
    """A 502 may come from a proxy after Buildkite took the create: whether a build exists is
    unknown, so the client looks for it for as long as a create can take, and no longer."""
    bk.fail_next(1, status=502, method="POST")

    lookup = StartLookup(patience=20.0, first_wait=1.0, max_wait=8.0)
    async with make_client(start_lookup=lookup) as bk_client:
        with pytest.raises(BuildMaybeStarted) as caught:
            await bk_client.create_build(
                "deploy-prod", commit="HEAD", branch="main", request_id="req-7"
            )

    assert sleeps.calls == [1.0, 2.0, 4.0, 8.0, 5.0]  # backoff, capped, adding up to 20 s
    assert [request.method for request in bk.requests] == ["POST"] + ["GET"] * 5
    assert all(r.params("meta_data[chatops_request_id]") == ["req-7"] for r in bk.requests[1:])
    assert bk.builds == []
    error = caught.value
    assert (error.request_id, error.reason) == ("req-7", "HTTP 502")
    assert "may have started" in str(error) and "may have started" in told(error)
    assert_no_secret(error)


async def test_a_create_that_buildkite_made_before_its_5xx_is_found(
    bk: FakeBuildkite, client: BuildkiteClient
) -> None:
    bk.fail_after_create_next(1, status=503)

    build = await client.create_build("deploy-prod", commit="HEAD", branch="main")

    assert build.number == 1 and len(bk.builds) == 1
    assert [request.method for request in bk.requests] == ["POST", "GET"]


async def test_a_create_that_could_not_connect_is_sent_again(
    make_client: Callable[..., BuildkiteClient], sleeps: Sleeps
) -> None:
    """Refused connections never carried the request: retried like any other call."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    async with BuildkiteClient(
        SECRET, "acme", base_url=f"http://127.0.0.1:{port}/v2", sleep=sleeps, max_retries=2
    ) as bk_client:
        with pytest.raises(BuildkiteUnavailable) as caught:
            await bk_client.create_build("deploy-prod", commit="HEAD", branch="main")
    assert caught.value.attempts == 3 and len(sleeps.calls) == 2


async def test_a_create_is_not_resent_when_the_lookup_fails(
    bk: FakeBuildkite, make_client: Callable[..., BuildkiteClient]
) -> None:
    bk.drop_after_create_next(1)
    bk.fail_next(2, status=503, method="GET")

    async with make_client(max_retries=0) as bk_client:
        build = await bk_client.create_build("deploy-prod", commit="HEAD", branch="main")

    # Two failed looks are no answer: it kept looking, and found the one build.
    assert [request.method for request in bk.requests] == ["POST", "GET", "GET", "GET"]
    assert build.number == 1 and len(bk.builds) == 1


async def test_a_create_that_times_out_everywhere_may_have_started(
    bk: FakeBuildkite, make_client: Callable[..., BuildkiteClient]
) -> None:
    bk.delay_next(10, 30.0)

    lookup = StartLookup(patience=0.0)
    async with make_client(timeout=0.1, max_retries=0, start_lookup=lookup) as bk_client:
        with pytest.raises(BuildMaybeStarted) as caught:
            await bk_client.create_build("deploy-prod", commit="HEAD", branch="main")

    # The create may or may not have happened; it is looked for, never sent again.
    assert [request.method for request in bk.requests] == ["POST", "GET"]
    assert caught.value.reason.startswith("ReadTimeout")


async def test_a_slow_create_is_found_when_buildkite_makes_it_after_the_timeout(
    bk: FakeBuildkite, make_client: Callable[..., BuildkiteClient]
) -> None:
    """Buildkite takes 1.5 s where the client waits 0.5 s: the build appears a second after
    the timeout, while the client looks for it, and is found rather than created twice."""
    bk.answer_late_next(1.5, "/builds", method="POST")

    async with BuildkiteClient(
        SECRET,
        "acme",
        base_url=bk.url,
        timeout=0.5,
        start_lookup=StartLookup(patience=10.0, first_wait=0.2, max_wait=0.4),
    ) as bk_client:
        build = await bk_client.create_build(
            "deploy-prod", commit="HEAD", branch="main", request_id="req-slow"
        )

    assert build.meta_data[REQUEST_ID_META_KEY] == "req-slow"
    assert len(bk.builds) == 1
    assert len(bk.requests_to("POST")) == 1


async def test_a_rebuild_whose_response_is_lost_makes_one_rebuild(
    bk: FakeBuildkite, make_client: Callable[..., BuildkiteClient]
) -> None:
    bk.add_build("deploy-prod", state="failed")
    bk.drop_response_next(1, "/rebuild", method="PUT")

    async with make_client() as bk_client:
        build = await bk_client.rebuild_build("deploy-prod", 1)

    assert build.number == 2
    assert build.rebuilt_from is not None and build.rebuilt_from.number == 1
    assert len(bk.builds) == 2
    assert [request.method for request in bk.requests] == ["PUT", "GET"]
    assert bk.requests[1].param("created_from") is not None


async def test_a_slow_rebuild_is_found_not_sent_again(
    bk: FakeBuildkite, make_client: Callable[..., BuildkiteClient]
) -> None:
    bk.add_build("deploy-prod", state="failed")
    bk.answer_late_next(1.5, "/rebuild", method="PUT")

    async with BuildkiteClient(
        SECRET,
        "acme",
        base_url=bk.url,
        timeout=0.5,
        start_lookup=StartLookup(patience=10.0, first_wait=0.2, max_wait=0.4),
    ) as bk_client:
        build = await bk_client.rebuild_build("deploy-prod", 1)

    assert build.rebuilt_from is not None and build.rebuilt_from.number == 1
    assert len(bk.builds) == 2 and len(bk.requests_to("PUT")) == 1


# Pagination


async def test_pagination_follows_the_link_header(
    bk: FakeBuildkite, client: BuildkiteClient
) -> None:
    for _ in range(250):
        bk.add_build("deploy-prod")

    numbers = [build.number async for build in client.list_builds(pipeline="deploy-prod")]

    assert numbers == list(range(250, 0, -1))
    assert [request.param("page") for request in bk.requests] == [None, "2", "3"]
    assert all(request.param("per_page") == "100" for request in bk.requests)
    assert all(request.path == f"{PIPE}/builds" for request in bk.requests)


async def test_pagination_stops_at_the_limit(bk: FakeBuildkite, client: BuildkiteClient) -> None:
    for _ in range(250):
        bk.add_build("deploy-prod")

    numbers = [build.number async for build in client.list_builds(limit=120)]

    assert numbers == list(range(250, 130, -1))
    assert len(bk.requests) == 2


async def test_a_small_limit_asks_for_a_small_page(
    bk: FakeBuildkite, client: BuildkiteClient
) -> None:
    for _ in range(10):
        bk.add_build("deploy-prod")

    assert len([build async for build in client.list_builds(limit=3)]) == 3
    assert bk.requests[0].query == [("per_page", "3")]
    assert [build async for build in client.list_builds(limit=0)] == []
    assert len(bk.requests) == 1


async def test_per_page_is_clamped_and_validated(
    bk: FakeBuildkite, client: BuildkiteClient
) -> None:
    assert [p.slug async for p in client.list_pipelines(per_page=500)] == ["deploy-prod"]
    assert bk.requests[0].query == [("per_page", "100")]
    with pytest.raises(ValueError, match="per_page"):
        client.list_pipelines(per_page=0)
    with pytest.raises(ValueError, match="limit"):
        client.list_agents(limit=-1)


# Path injection


def bad_calls(c: BuildkiteClient) -> list[Callable[[], object]]:
    job = "0183c4e6-c88c-4b42-b15e-7801077a9181"
    return [
        lambda: c.create_build("../x", commit="HEAD", branch="main"),
        lambda: c.create_build("a/b", commit="HEAD", branch="main"),
        lambda: c.create_build("a%2Fb", commit="HEAD", branch="main"),
        lambda: c.create_build("", commit="HEAD", branch="main"),
        lambda: c.create_build(" deploy", commit="HEAD", branch="main"),
        lambda: c.create_build("deploy\n", commit="HEAD", branch="main"),
        lambda: c.get_build("deploy-prod/../../other", 1),
        lambda: c.get_build("a..b", 1),
        lambda: c.get_build("deploy-prod", 0),
        lambda: c.get_build("deploy-prod", True),
        lambda: c.cancel_build("deploy-prod?x=1", 1),
        lambda: c.retry_job("deploy-prod", 1, f"{job}/../../cancel"),
        lambda: c.retry_job("deploy-prod", 1, "abc/def"),
        lambda: c.unblock_job("deploy-prod", 1, "..", fields={}),
        lambda: c.job_log_tail("deploy-prod", 1, "a%2F"),
        lambda: c.get_agent("a/b"),
        lambda: c.stop_agent("x y"),
        lambda: c.get_pipeline(".."),
        lambda: c.update_pipeline("a#b", name="x"),
        lambda: c.delete_pipeline("deploy-prod/"),
        lambda: c.list_builds(pipeline="a/b"),
        lambda: c.list_builds(meta_data={"a]&x[": "1"}),
        lambda: c.list_builds(state=["runnin"]),
    ]


async def test_path_injection_is_refused_before_any_request(
    bk: FakeBuildkite, client: BuildkiteClient
) -> None:
    for index, call in enumerate(bad_calls(client)):
        with pytest.raises(ValueError):  # sync (list_*) or async, it must raise before sending
            result = call()
            if isinstance(result, Awaitable):
                await result
        assert bk.requests == [], f"bad call #{index} reached the server"


@pytest.mark.parametrize("org", ["ac/me", "../acme", ""])
def test_a_bad_org_slug_is_refused(org: str) -> None:
    with pytest.raises(ValueError):
        BuildkiteClient(SECRET, org)


# The token never leaks


async def test_no_error_text_contains_the_token(
    bk: FakeBuildkite, make_client: Callable[..., BuildkiteClient]
) -> None:
    bk.add_build("deploy-prod", state="passed")
    errors: list[BuildkiteError] = []

    async def capture(action: Awaitable[object]) -> None:
        try:
            await action
        except BuildkiteError as error:
            errors.append(error)

    async with make_client(max_retries=0, max_rate_limit_wait=0, timeout=0.1) as bk_client:
        await capture(bk_client.get_pipeline("missing"))  # 404
        await capture(bk_client.create_build("deploy-prod", commit="", branch=""))  # 422
        await capture(
            bk_client.retry_job("deploy-prod", 1, bk.build("deploy-prod", 1)["jobs"][0]["id"])
        )
        bk.fail_next(1, 500)
        await capture(bk_client.get_user())  # 500
        bk.rate_limit_next(1, reset=5)
        await capture(bk_client.get_user())  # 429
        bk.delay_next(1, 30.0)
        await capture(bk_client.get_user())  # timeout
        bk.scopes.remove("read_user")
        await capture(bk_client.get_user())  # 403
    async with make_client(token="wrong-" + SECRET) as bk_client:
        await capture(bk_client.get_user())  # 401, with the secret inside the wrong token

    assert [type(error).__name__ for error in errors] == [
        "NotFound",
        "ValidationFailed",
        "BadRequest",
        "ServerError",
        "RateLimited",
        "BuildkiteUnavailable",
        "PermissionDenied",
        "AuthenticationError",
    ]
    for error in errors:
        assert_no_secret(error)


def echo_transport(request: httpx.Request) -> httpx.Response:
    """Answers 400 quoting the Authorization header back, as a careless proxy might."""
    echoed = request.headers["Authorization"]
    return httpx.Response(
        400,
        json={"message": f"bad header {echoed}", "errors": [{"field": "auth", "code": echoed}]},
    )


async def test_a_token_echoed_by_the_server_is_scrubbed(sleeps: Sleeps) -> None:
    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(echo_transport)) as http,
        BuildkiteClient(SECRET, "acme", http=http, sleep=sleeps) as bk_client,
    ):
        with pytest.raises(BadRequest) as caught:
            await bk_client.get_user()

    assert caught.value.message == "bad header Bearer [redacted]"
    assert caught.value.errors == [{"field": "auth", "code": "Bearer [redacted]"}]
    assert_no_secret(caught.value)
    assert SECRET not in repr(bk_client)


# Pure transport unit tests (httpx.MockTransport)


async def test_backoff_doubles_per_retry(sleeps: Sleeps) -> None:
    def always_502(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="bad gateway")

    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(always_502)) as http,
        BuildkiteClient(
            SECRET, "acme", http=http, sleep=sleeps, max_retries=4, backoff_base=1.0
        ) as bk_client,
    ):
        with pytest.raises(ServerError):
            await bk_client.get_user()

    for index, (waited, base) in enumerate(zip(sleeps.calls, [1, 2, 4, 8], strict=True)):
        assert base <= waited <= base + 1.0, (index, waited)


async def test_a_next_link_to_another_host_is_not_followed(sleeps: Sleeps) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        headers = {"Link": '<https://evil.example/v2/builds?page=2>; rel="next"'}
        return httpx.Response(200, json=[], headers=headers)

    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http,
        BuildkiteClient(SECRET, "acme", http=http, sleep=sleeps) as bk_client,
    ):
        with pytest.raises(BuildkiteError, match=r"evil\.example"):
            [build async for build in bk_client.list_builds()]

    assert seen == ["https://api.buildkite.com/v2/organizations/acme/builds?per_page=100"]


async def test_a_json_log_answer_is_tailed(sleeps: Sleeps) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {"url": "x", "content": "a" * 50 + "the end", "size": 57, "header_times": []}
        return httpx.Response(
            200, content=json.dumps(body), headers={"Content-Type": "application/json"}
        )

    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http,
        BuildkiteClient(SECRET, "acme", http=http, sleep=sleeps) as bk_client,
    ):
        assert await bk_client.job_log_tail("p", 1, "job-1", max_bytes=10) == "aaathe end"


def test_every_api_error_class_is_a_buildkite_error() -> None:
    for cls in (AuthenticationError, PermissionDenied, NotFound, ValidationFailed, BadRequest):
        assert issubclass(cls, BuildkiteAPIError)
    assert issubclass(BuildkiteUnavailable, BuildkiteError)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("<html>maintenance</html>", "not JSON"),
        ('{"name": "no id"}', "not a User (bad id)"),
    ],
)
async def test_a_2xx_body_that_is_not_the_resource_is_unexpected(
    sleeps: Sleeps, body: str, reason: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=body)

    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http,
        BuildkiteClient(SECRET, "acme", http=http, sleep=sleeps) as bk_client,
    ):
        with pytest.raises(UnexpectedResponse) as caught:
            await bk_client.get_user()

    assert str(caught.value) == f"Buildkite sent an unexpected answer to GET /user: {reason}"
    assert told(caught.value) == (
        "Could not deploy `deploy-prod`: Buildkite sent an answer the bot did not understand."
    )
