"""Who is in the sandbox: its simulated people, who type lines and press buttons, and the
simulated Buildkite agents builds run on."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Person:
    """Someone in the sandbox's Slack workspace."""

    name: str
    user_id: str
    about: str


#: The sandbox's people; the demo policy (demo_policy.yml) names them by these ids.
PEOPLE = {
    person.name: person
    for person in (
        Person("alice", "U0USER", "an engineer"),
        Person("bob", "U0BOB", "an on-call lead: approves deploys, may stop agents"),
    )
}
#: The simulated agents builds run on, in queue `default`.
AGENTS = ("builder-1", "builder-2", "builder-3")
