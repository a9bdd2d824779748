"""The control API's constants are written once for the gateway (gateway/engines/control_api.py); the two
engines keep their own copies (the vLLM plugin cannot import the gateway). They must agree: the contract suite
checks the engines' behaviour against the gateway's constants, this checks the copies themselves."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from backends.sim import core as sim_core
from backends.sim import server as sim_server
from gateway.engines import control_api
from gateway.policy.types import Decision

ROOT = Path(__file__).resolve().parents[2]


def _plugin_commands():  # type: ignore[no-untyped-def]
    """backends/vllm/tokenflow_vllm/commands.py, loaded by path: importing its package would import vLLM."""
    path = ROOT / "backends/vllm/tokenflow_vllm/commands.py"
    spec = importlib.util.spec_from_file_location("tokenflow_vllm_commands", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_vllm_plugin_and_the_simulator_use_the_gateways_constants() -> None:
    plugin = _plugin_commands()
    assert tuple(plugin.OPS) == tuple(sim_core.OPS) == control_api.OPS
    assert plugin.MAX_COMMANDS == sim_server.MAX_COMMANDS == control_api.MAX_COMMANDS
    assert sim_server.CONTROL_VERSION == control_api.VERSION
    assert set(sim_server.CONTROL_HEADERS) == {control_api.VERSION_HEADER}
    for candidate in ("a", "A.b-9_", "x" * 128, "x" * 129, "", "sp ace", "sl/ash", "ü", "\na", "a\n"):
        want = control_api.ID_RE.fullmatch(candidate) is not None
        assert (plugin.ID_RE.fullmatch(candidate) is not None) == want, candidate
        assert (sim_server.ID_RE.fullmatch(candidate) is not None) == want, candidate


def test_decisions_are_commands_of_the_api() -> None:
    for op in control_api.OPS:
        cmd = Decision(op, "r1", 3 if op == "priority" else None).to_command()
        assert cmd["op"] in control_api.OPS and control_api.ID_RE.fullmatch(str(cmd["id"]))
        assert ("priority" in cmd) == (op == "priority")


def test_the_vllm_plugin_refuses_an_id_with_a_trailing_newline() -> None:
    assert control_api.ID_RE.fullmatch("a\n") is None
    assert _plugin_commands().ID_RE.fullmatch("a\n") is None
