"""The small sentences of the bot read as sentences and promise only what is known."""

from __future__ import annotations

from app.slack.render import answers, deploys
from app.slack.render.deploys import DeployPlan


def test_the_lock_announcement_ends_its_reason_with_a_full_stop() -> None:
    text = deploys.lock_announcement("U1", "web", " until unlocked", "release freeze")
    assert "release freeze. Nobody else can deploy it meanwhile." in text
    said = deploys.lock_announcement("U1", "web", " until unlocked", "release freeze!")
    assert "release freeze! Nobody else" in said
    assert deploys.lock_announcement("U1", "web", "", "").endswith(
        "locked `web`. Nobody else can deploy it meanwhile."
    )


def test_an_approval_under_a_minute_shows_its_seconds() -> None:
    plan = DeployPlan("web", "main", "HEAD", "", {}, "U1", approvers=("@ops",), expires_in=30)
    text = deploys.approval_request(plan, "0123456789abcdef").text
    assert "expires in 30 s." in text and "0 min" not in text
    assert deploys.expiry_text(600) == "10 min"
    assert deploys.expiry_text(90) == "2 min"


def test_the_deploy_ack_promises_no_build_before_the_checks() -> None:
    """It is sent before the policy and the pipeline are checked, so a refusal may follow."""
    for position in (0, 3):
        text = answers.starting("web", position)
        assert "you may deploy it…" in text
    assert "Starting a build of `web` if it exists" in answers.starting("web", 0)
