"""Agents as operators: an MCP server (Streamable HTTP at /mcp, and stdio) whose tools are the
same core operations people use from Slack, under the same policy, locks, approvals and audit.

`identity` (who an agent is, from its bearer token), `budget` (its per-agent rates, in Redis),
`arguments` and `views` (what a call takes and answers), `context` (what a call runs with),
`tools` (one function per tool, and their table), `gateway` (what every call goes through),
`waiting` (wake-ups from the tracker's own changes), `server` (the SDK's server), `http` (the
aiohttp route) and `stdio` (`python -m app mcp`).
"""
