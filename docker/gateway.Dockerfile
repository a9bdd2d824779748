# The TokenFlow gateway; the same image serves the simulated engine (`engine-sim`).
#   docker build -f docker/gateway.Dockerfile -t tokenflow-gateway .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENFLOW_PROFILES_DIR=/app/configs/profiles

WORKDIR /app
# Dependencies first (cached while only the code changes): the pinned set from pyproject.toml.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml','rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY gateway ./gateway
COPY backends/__init__.py ./backends/__init__.py
COPY backends/sim ./backends/sim
COPY bench ./bench
COPY configs/profiles ./configs/profiles
RUN pip install --no-deps . && useradd --system --uid 10001 --no-create-home tokenflow

USER tokenflow
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"
ENTRYPOINT ["tokenflow"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
