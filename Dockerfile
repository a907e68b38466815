# Tollgate image: the same code and Procfile as the local stack (bin/run-stack).
FROM python:3.11-slim AS build
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gatewaysite gatewaysite
COPY tenants tenants
COPY billing billing
COPY routing routing
COPY dashboard dashboard
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TOLLGATE_VAR_DIR=/app/var
RUN useradd --create-home --uid 10001 tollgate
WORKDIR /app
COPY --from=build /install /usr/local
# The code stays root's (read-only to the app); only var/ is the app user's. Its
# usage-spool/ keeps usage events while Redis is away: mount a volume there
# (docker-compose.yml does), so a replaced container's spool is replayed, not lost.
COPY . /app
RUN mkdir -p /app/var/usage-spool && chown -R tollgate:tollgate /app/var
USER tollgate
# Static files are baked into the image; DEBUG only lets settings load without secrets.
RUN DEBUG=1 python manage.py collectstatic --noinput -v 0
EXPOSE 8000
# Liveness: /healthz answers while the web process runs, whatever its dependencies
# do. Readiness (/readyz: database, Redis, usage ingestion) is for load balancers;
# restarting a process would not bring a dependency back.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=2)" || exit 1
CMD ["bin/run-process", "web"]
