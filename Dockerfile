# creditgate: the HTTP API served by granian. Needs DATABASE_URL and REDIS_URL at run time, e.g.
#   docker build -t creditgate .
#   docker run --rm -p 8000:8000 -e DATABASE_URL=postgresql://... -e REDIS_URL=redis://... creditgate
# One-off commands use the same image:
#   docker run --rm -e DATABASE_URL=... creditgate creditgate migrate
#   docker run --rm -e DATABASE_URL=... creditgate creditgate keys create --scope runtime
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CREDITGATE_MIGRATIONS_DIR=/app/migrations \
    CREDITGATE_DATA_DIR=/app/.data

RUN useradd --system --uid 10001 --user-group --home-dir /app --shell /usr/sbin/nologin creditgate

# Install the package (not editable) from a scratch folder, then drop the sources.
WORKDIR /src
COPY pyproject.toml ./
COPY app ./app
RUN pip install --no-cache-dir . && rm -rf /src

WORKDIR /app
COPY migrations ./migrations
# .data is only used by the embedded fallback (no DATABASE_URL/REDIS_URL); keep it writable.
RUN mkdir -p /app/.data && chown creditgate:creditgate /app/.data

USER creditgate
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]

CMD ["creditgate", "serve", "--host", "0.0.0.0", "--port", "8000"]
