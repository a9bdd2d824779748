"""Voice pipeline tests: real espeak-ng speech, durations checked with sox. Their figures are printed at the end."""

from __future__ import annotations

import shutil

import pytest

FIGURES: dict[str, str] = {}


@pytest.fixture(scope="session", autouse=True)
def _speech_tools() -> None:
    missing = [t for t in ("espeak-ng", "sox") if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} missing: run scripts/install-test-deps.sh")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    if FIGURES:
        terminalreporter.write_sep("-", "voice pipeline figures")
        for k, v in FIGURES.items():
            terminalreporter.write_line(f"{k}: {v}")
