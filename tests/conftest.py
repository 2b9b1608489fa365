"""Shared pytest configuration: devices, markers, hypothesis profiles.

* ``DEVICES`` / the ``device`` fixture: "cpu", plus "cuda" which is skipped
  (with the reason) when no GPU is visible.
* ``CPU_CAPABILITIES`` / the ``cpu_capability`` fixture: each CPU kernel level this machine
  runs ("default", "avx2", "avx512"), switched to for the test and back afterwards.
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

from lorax_merge import _C

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


#: CPU capability levels compiled in that this machine can run, lowest first
CPU_CAPABILITIES = _C.supported_cpu_capabilities()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: large inputs; deselect with -m 'not slow'")
    config.addinivalue_line("markers", "cuda: needs a visible CUDA device")


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Each supported device in turn; CUDA is skipped without a GPU."""
    return request.param


@pytest.fixture(params=CPU_CAPABILITIES)
def cpu_capability(request: pytest.FixtureRequest):
    """The CPU kernels switched to each supported level in turn, then back."""
    previous = _C.cpu_capability()
    _C._set_cpu_capability(request.param)
    yield request.param
    _C._set_cpu_capability(previous)


@pytest.fixture(autouse=True)
def _fixed_seed() -> None:
    """Every test starts from the same global RNG state."""
    torch.manual_seed(1234)
