"""The shape of a pipeline slug, checked in one place by the parsers, the policy and the
button models alike."""

from __future__ import annotations

import re

#: As Buildkite makes them from a pipeline's name: lowercase letters, digits and dashes.
PIPELINE_SLUG_PATTERN = r"^[a-z0-9][a-z0-9-]{0,99}$"
PIPELINE_SLUG = re.compile(PIPELINE_SLUG_PATTERN)


def is_pipeline_slug(text: str) -> bool:
    """Whether `text` could be a pipeline slug (and so is safe to put in a URL or a key)."""
    return PIPELINE_SLUG.match(text) is not None
