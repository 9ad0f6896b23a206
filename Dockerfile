# syntax=docker/dockerfile:1
# Production image: build a wheel, install it into a clean slim image, run as a non-root user.
#
#   docker build -t gateway .
#   docker run -p 8080:8080 -v "$PWD/gateway.yaml:/etc/gateway/gateway.yaml:ro" \
#              -e JWT_SECRET -e GATEWAY_SECRET -e REDIS_URL gateway

# --- build: the gateway wheel plus wheels of every dependency --------------------------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY gateway ./gateway
RUN python -m pip wheel --wheel-dir /wheels .

# --- runtime -------------------------------------------------------------------------------
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GATEWAY_CONFIG=/etc/gateway/gateway.yaml
COPY --from=build /wheels /wheels
RUN python -m pip install --no-index --find-links /wheels gateway \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home --shell /usr/sbin/nologin gateway \
    && mkdir -p /etc/gateway
# Mount the config (and any key files) at /etc/gateway; secrets come from the environment.
USER 10001:10001
EXPOSE 8080
# No curl in slim images: probe with the interpreter. Adjust the path if server.prefix changes.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/.gateway/health', timeout=2).status == 200 else 1)"]
CMD ["gateway", "serve", "--host", "0.0.0.0", "--port", "8080"]
