from pathlib import Path

import pytest

from gateway.config import load_config, reference_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_reference_is_current():
    assert (ROOT / "docs/configuration.md").read_text() == reference_markdown(), (
        "docs/configuration.md is stale: run `python -m gateway.config > docs/configuration.md`"
    )


def test_file_then_environment(tmp_path, monkeypatch):
    f = tmp_path / "gw.yaml"
    f.write_text("server: {port: 9100}\nscheduler: {policy: fcfs, tick_interval_s: 0.5}\n")
    cfg = load_config(f)
    assert cfg.server.port == 9100 and cfg.scheduler.tick_interval_s == 0.5
    monkeypatch.setenv("TOKENFLOW_SERVER__PORT", "9200")
    monkeypatch.setenv("TOKENFLOW_ENGINES", '[{"name": "a", "url": "http://127.0.0.1:1"}]')
    cfg = load_config(f)
    assert cfg.server.port == 9200
    assert [e.name for e in cfg.engines] == ["a"]


@pytest.mark.parametrize(
    "text",
    ["server: {port: -1}", "streams: {default_rate: 0}", "bogus: 1", "engines: []", "engines: [{name: 'a b'}]", "- 1"],
)
def test_bad_config_is_refused(tmp_path, text):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ValueError):  # pydantic's ValidationError is one
        load_config(f)


def test_shipped_configs_load():
    for f in sorted((ROOT / "configs").glob("gateway*.yaml")):
        load_config(f)
