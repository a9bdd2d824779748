"""The engine-control contract suite (tests/contract) against the real vLLM engine.

Same test functions, collected here a second time: this directory's conftest provides ``engine_url``
(the vLLM server) and re-exports the suite's ``api`` fixture, so nothing in tests/contract changes.
"""
import pytest

from tests.contract.test_control_api import *  # noqa: F403
from tests.contract.test_openai_api import *  # noqa: F403

pytestmark = pytest.mark.vllm
