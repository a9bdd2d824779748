"""The shipped docker-compose.yml, validated by ``docker-compose config`` and checked for what operators rely on."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import yaml

from tests.deploy.compose import ROOT, aliases, load, run_config


def _load_launch():
    """The vLLM plugin's command-line builder; it imports nothing from vLLM."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tokenflow_vllm_launch",
                                                  ROOT / "backends/vllm/tokenflow_vllm/launch.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


launch = _load_launch()

ENV = {"TOKENFLOW_CONTROL_TOKEN": "compose-test-token"}
ENGINES = ("engine-1", "engine-2")


@pytest.fixture(scope="module")
def gpu() -> dict:
    return load(ENV, "gpu")


@pytest.fixture(scope="module")
def sim() -> dict:
    return load(ENV, "sim")


def test_docker_compose_config_accepts_both_profiles(gpu, sim):
    core = {"lb", "gateway-1", "gateway-2", "redis", "prometheus", "grafana"}
    assert set(gpu["services"]) == core | {"vllm-1", "vllm-2"}
    assert set(sim["services"]) == core | {"sim-1", "sim-2"}


def test_the_control_token_is_required():
    proc = run_config({}, "--profile", "sim")
    assert proc.returncode != 0 and "TOKENFLOW_CONTROL_TOKEN" in proc.stderr


@pytest.mark.parametrize("profile", ["gpu", "sim"])
def test_each_profile_provides_both_engines_under_the_names_the_gateways_use(profile, gpu, sim):
    model = {"gpu": gpu, "sim": sim}[profile]
    provided = [a for svc in model["services"].values() for a in aliases(svc)]
    assert sorted(provided) == sorted(ENGINES)
    for gw in ("gateway-1", "gateway-2"):
        env = model["services"][gw]["environment"]
        engines = json.loads(env["TOKENFLOW_ENGINES"])
        assert [e["url"] for e in engines] == [f"http://{n}:8000" for n in ENGINES]
        assert env["TOKENFLOW_AUTH__CONTROL_TOKEN"] == ENV["TOKENFLOW_CONTROL_TOKEN"]
        assert env["TOKENFLOW_SESSION__STORE"] == "redis" and env["TOKENFLOW_SESSION__REDIS_URL"].startswith("redis://redis:")
        assert env["TOKENFLOW_SESSION__REPLICA_ID"] == gw
    for svc in model["services"].values():
        if set(aliases(svc)) & set(ENGINES):
            assert svc["environment"]["TOKENFLOW_CONTROL_TOKEN"] == ENV["TOKENFLOW_CONTROL_TOKEN"]


def test_engines_and_redis_are_reachable_only_inside_the_stack(gpu, sim):
    assert gpu["networks"]["backend"].get("internal") is True
    for model in (gpu, sim):
        for name, svc in model["services"].items():
            if name.startswith(("vllm", "sim", "redis", "gateway")):
                assert not svc.get("ports"), f"{name} must not publish ports"
            if name.startswith(("vllm", "sim", "redis")):
                assert "edge" not in (svc.get("networks") or {}), name
        assert [p["target"] for p in model["services"]["lb"]["ports"]] == [8000]
        for name in ("prometheus", "grafana"):  # UIs on the host's loopback only
            assert all(str(p).startswith("127.0.0.1:") for p in model["services"][name]["ports"]), name


def test_vllm_engines_run_the_plugin_on_the_pinned_image_with_a_gpu_each(gpu):
    dockerfile = (ROOT / "docker" / "vllm.Dockerfile").read_text()
    assert re.search(r"^ARG VLLM_IMAGE=vllm/vllm-openai:v0\.33\.\d+$", dockerfile, re.M)
    assert re.search(r"^FROM \$\{VLLM_IMAGE\}$", dockerfile, re.M)
    assert "backends/vllm" in dockerfile and "--no-deps" in dockerfile
    gpus = []
    for name in ("vllm-1", "vllm-2"):
        svc = gpu["services"][name]
        assert svc["build"]["dockerfile"] == "docker/vllm.Dockerfile"
        assert re.fullmatch(r"vllm/vllm-openai:v0\.33\.\d+", svc["build"]["args"]["VLLM_IMAGE"])
        (dev,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert dev["capabilities"] == ["gpu"] and dev["driver"] == "nvidia"
        gpus += dev["device_ids"]
        args = svc["command"]
        flags = dict(a.split("=", 1) for a in args if a.startswith("--"))
        assert flags["--scheduler-cls"] == "tokenflow_vllm.scheduler.TokenFlowAsyncScheduler"
        assert flags["--scheduling-policy"] == "priority"
        assert flags["--served-model-name"] == "llama3-8b" and flags["--port"] == "8000"
        # The same flags the plugin's own launcher builds (backends/vllm/tokenflow_vllm/launch.py).
        kv = json.loads(flags["--kv-transfer-config"])
        assert kv == json.loads(launch.kv_transfer_config(64_000_000_000))
        # else decode KV is never written through
        assert kv["kv_connector_extra_config"]["offload_prompt_only"] is False
        assert flags["--scheduler-cls"] == launch.SCHEDULER_ASYNC
        assert svc["environment"]["VLLM_PLUGINS"] == launch.PLUGINS
    assert sorted(gpus) == ["0", "1"]
    # The entry points those names refer to are the plugin's.
    plugin = (ROOT / "backends" / "vllm" / "pyproject.toml").read_text()
    assert "tokenflow_engine = " in plugin and "tokenflow_control = " in plugin


def test_sim_engines_serve_the_model_name_the_gateways_route(sim):
    profiles = ROOT / "configs" / "profiles"
    for name in ("sim-1", "sim-2"):
        cmd = sim["services"][name]["command"]
        profile = cmd[cmd.index("--profile") + 1]
        model_name = yaml.safe_load((profiles / f"{profile}.yaml").read_text())["model"]["name"]
        engines = json.loads(sim["services"]["gateway-1"]["environment"]["TOKENFLOW_ENGINES"])
        gw_models = {m for e in engines for m in e["models"]}
        assert gw_models == {model_name}


def test_prometheus_scrapes_every_gateway_and_engine(sim):
    prom = yaml.safe_load((ROOT / "configs" / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {"gateway-1:8000", "gateway-2:8000", "engine-1:8000", "engine-2:8000"}
    assert "backend" in sim["services"]["prometheus"]["networks"]
    mounted = {v.split(":")[1] for v in sim["services"]["prometheus"]["volumes"]}
    assert "/etc/prometheus/prometheus.yml" in mounted


def test_the_gateway_image_runs_the_command_compose_gives_it(sim):
    dockerfile = (ROOT / "docker" / "gateway.Dockerfile").read_text()
    assert 'ENTRYPOINT ["tokenflow"]' in dockerfile
    for name in ("gateway-1", "gateway-2"):
        assert sim["services"][name]["command"][0] == "serve"
    assert sim["services"]["sim-1"]["command"][0] == "engine-sim"
    # Everything the Dockerfile copies exists in the build context and is not excluded by .dockerignore.
    ignored = (ROOT / ".dockerignore").read_text().split()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for src in shlex.split(line)[1:-1]:
                assert (ROOT / src).exists(), src
                assert src not in ignored, src
