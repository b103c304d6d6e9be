# ollamamq in a small image: non-root, the database in the /data volume, configured by the
# same environment variables as everywhere else (README "Options").
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HOST=0.0.0.0 \
    PORT=11435 \
    DB_PATH=/data/ollamamq.db \
    LOG_FILE=""

WORKDIR /app
# templates/, static/ and migrations/ live beside the package: an editable install keeps them found.
COPY setup.cfg pyproject.toml README.md wsgi.py ./
COPY ollamamq ./ollamamq
COPY templates ./templates
COPY static ./static
COPY migrations ./migrations
RUN pip install --no-compile -e . \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin ollamamq \
    && mkdir -p /data \
    && chown ollamamq /data

USER 10001
VOLUME ["/data"]
EXPOSE 11435
# 503 while draining after SIGTERM: the orchestrator stops sending before the streams end.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ['PORT']}/health\", timeout=4)"]
STOPSIGNAL SIGTERM
CMD ["ollamamq"]
