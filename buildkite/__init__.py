"""Async client, models, errors and webhook verification for Buildkite's REST API v2.

This package knows nothing of Slack.
"""
