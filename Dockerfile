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
COPY --chown=tollgate:tollgate . /app
RUN mkdir -p /app/var && chown tollgate:tollgate /app/var
USER tollgate
# Static files are baked into the image; DEBUG only lets settings load without secrets.
RUN DEBUG=1 python manage.py collectstatic --noinput -v 0
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/admin/login/', timeout=2)" || exit 1
CMD ["bin/run-process", "web"]
