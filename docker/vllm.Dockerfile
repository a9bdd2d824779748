# A vLLM engine with the TokenFlow plugin (backends/vllm): the official image at the pinned version, plus the plugin.
#   docker build -f docker/vllm.Dockerfile -t tokenflow-vllm:v0.33.0 .
# The plugin checks the vLLM version at start and refuses others (tokenflow_vllm.compat).
ARG VLLM_IMAGE=vllm/vllm-openai:v0.33.0
FROM ${VLLM_IMAGE}

COPY backends/vllm/pyproject.toml /opt/tokenflow-vllm/pyproject.toml
COPY backends/vllm/tokenflow_vllm /opt/tokenflow-vllm/tokenflow_vllm
# No dependencies of its own (vLLM is already here); the image installs with uv, plain pip where uv is absent.
RUN if command -v uv >/dev/null 2>&1; then uv pip install --system --no-deps /opt/tokenflow-vllm; \
    else python3 -m pip install --no-cache-dir --no-deps /opt/tokenflow-vllm; fi \
    && python3 -c "import importlib.metadata as m; eps = m.entry_points(); \
assert any(e.name == 'tokenflow_engine' for e in eps.select(group='vllm.general_plugins')); \
assert any(e.name == 'tokenflow_control' for e in eps.select(group='vllm.endpoint_plugins'))"

# Both plugins must be named: once VLLM_PLUGINS is set it also filters the general plugins.
ENV VLLM_PLUGINS=tokenflow_engine,tokenflow_control
# The official entrypoint stays `vllm serve`; docker-compose.yml passes the model and the TokenFlow flags.
