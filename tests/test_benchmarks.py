"""The harness's performance bounds (issue 6), measured in one process; out of the default run.

Run alone on a quiet machine: OMP_NUM_THREADS=1 python -m pytest -m benchmark tests/test_benchmarks.py
(the same measurements as `bench profile harness` and `bench profile sweep`; the sweep benchmark sets its own
threads: the local executor's default, one per Ray worker).
"""

import pytest

from bench.profile import HarnessBenchmark, run_harness_benchmarks

pytestmark = pytest.mark.benchmark


@pytest.fixture(scope="module")
def measured():
    return run_harness_benchmarks(HarnessBenchmark())


@pytest.mark.parametrize("name", ["harness_overhead", "throughput_ratio", "metric_phase_ratio", "cached_metric_speedup",
                                  "streamed_metric_ratio"])
def test_bound_holds(measured, name):
    check = measured["checks"][name]
    assert check["holds"], f"{name} = {check['value']:.4g}, bound {check['kind']} {check['bound']} ({measured['environment']})"


def test_same_images_and_values_as_the_plain_libraries(measured):
    v = measured["values"]
    assert v["same_images"] == 1.0  # DDIMPipeline made the harness's images byte for byte
    assert v["fid_rel_difference"] < 1e-5 and v["kid_abs_difference"] < 1e-6  # torch-fidelity's own numbers


@pytest.fixture(scope="module")
def swept():
    from bench.profile import SweepBenchmark, run_sweep_benchmarks

    return run_sweep_benchmarks(SweepBenchmark())


@pytest.mark.parametrize("name", ["sweep_overhead_ratio", "ray_throughput_ratio"])
def test_sweep_bound_holds(swept, name):
    """issue 20: a sweep costs its cells' work and little more; two one-CPU Ray workers outrun the local executor."""
    check = swept["checks"][name]
    assert check["holds"], f"{name} = {check['value']:.4g}, bound {check['kind']} {check['bound']} ({swept['environment']})"
