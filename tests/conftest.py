"""Shared pytest configuration: devices, markers, hypothesis profiles.

* ``DEVICES`` / the ``device`` fixture: "cpu", plus "cuda" which is skipped
  (with the reason) when no GPU is visible.
* ``@pytest.mark.slow``: large cases; deselect with ``-m "not slow"``.
* Hypothesis profiles: ``ci`` (default; a few hundred examples over the whole
  suite) and ``nightly`` (thousands), chosen with ``HYPOTHESIS_PROFILE``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).resolve().parent
for _path in (_HERE, _HERE.parent / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    settings = None
else:
    _common = dict(
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.register_profile("ci", max_examples=40, **_common)
    settings.register_profile("nightly", max_examples=1500, **_common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

CUDA_AVAILABLE = torch.cuda.is_available()
_NO_CUDA = "no CUDA device visible"

#: devices every device-parametrised test runs on
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_AVAILABLE, reason=_NO_CUDA)),
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: large inputs; deselect with -m 'not slow'")
    config.addinivalue_line("markers", "cuda: needs a visible CUDA device")


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Each supported device in turn; CUDA is skipped without a GPU."""
    return request.param


@pytest.fixture(autouse=True)
def _fixed_seed() -> None:
    """Every test starts from the same global RNG state."""
    torch.manual_seed(1234)
