"""Block Kit renderers: pure functions from typed models to the JSON posted to Slack.

Every message the bot writes is built in these modules, so a test can assert on its exact JSON,
and every user-supplied string is escaped (app.slack.mrkdwn) and clipped to Block Kit's limits
here, once.
"""
