# syntax=docker/dockerfile:1

# Build stage: the pinned dependencies (requirements.lock), then the bot itself, in a virtualenv.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
COPY requirements.lock ./
RUN pip install -r requirements.lock
COPY pyproject.toml README.md LICENSE ./
COPY app ./app
COPY handlers ./handlers
COPY buildkite ./buildkite
RUN pip install --no-deps . && pip check

# Runtime stage: only the virtualenv, run by an unprivileged user.
FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PORT=3000
RUN useradd --create-home --uid 10001 bot
COPY --from=build /opt/venv /opt/venv
USER 10001
WORKDIR /home/bot
# The sandbox (and its simulators of Slack and Buildkite) needs only the installed package:
# run it on the image as shipped, far from any source tree, so a build that broke it fails here.
RUN python -m app sandbox --speed 20 --run "/deploy web main" | grep "passed in"
EXPOSE 3000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '3000'), timeout=4)"]
CMD ["python", "-m", "app"]
