"""What a lock's holder and its channel read about the lock: the reminder, the expiry, the lift."""

from __future__ import annotations

from app.slack.mrkdwn import code, person
from app.slack.render.deploys import lock_reason
from app.storage.records import PipelineLock


def held_for(seconds: float) -> str:
    """`4 h`, `1 d 2 h`, `45 min`: how long a lock has been held, roughly."""
    minutes = int(seconds // 60)
    days, rest = divmod(minutes, 24 * 60)
    hours, minutes = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{minutes} min"


def lock_reminder(lock: PipelineLock, held: float) -> str:
    return (
        f":lock: You have held the lock on {code(lock.pipeline)} for {held_for(held)}"
        f"{lock_reason(lock.reason)}. Nobody else can deploy it meanwhile: "
        f"`/deploy unlock {lock.pipeline}` once you are done."
    )


def lock_expired(lock: PipelineLock) -> str:
    return (
        f":unlock: The lock {person(lock.user)} took on {code(lock.pipeline)}"
        f"{lock_reason(lock.reason)} has expired: anyone allowed may deploy it again."
    )


def lock_lifted(lock: PipelineLock, by: str) -> str:
    return (
        f":unlock: {person(by)} lifted your lock on {code(lock.pipeline)}"
        f"{lock_reason(lock.reason)}. Others may deploy it again."
    )
