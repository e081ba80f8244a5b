"""Paper claims checked on the embedded world (the committed models), each test naming its paper.

Every cell runs the real harness path (plan, per-sample seeds, counted NFE, metrics)
on the embedded pixel DDPM with 256 samples, against the shapes16 reference set.
A claim that stops holding fails its test; the README and the issue notes report
the measured values.
"""

from __future__ import annotations

import functools

import pytest

from bench.runner import evaluate, plan_run, sample
from bench.spec import RunSpec

N = 256


@functools.lru_cache(maxsize=None)
def measure(method: str, steps: int, model: str = "embedded-ddpm", metrics: tuple[str, ...] = ("fid", "latency"),
            **method_args) -> dict[str, float]:
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        spec = RunSpec(method=method, steps=steps, model=model, num_samples=N, batch_size=N, metrics=metrics,
                       method_args=method_args, output=out, device="cpu")
        plan = plan_run(spec)
        samples, timings = sample(plan, progress=False)
        return evaluate(plan, samples, timings)


def fid(method: str, steps: int, **kw) -> float:
    return measure(method, steps, **kw)["fid"]


@pytest.mark.parametrize("steps", [
    10,
    pytest.param(20, marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
        "the claim 'DDIM (eta=0) has a lower FID than DDPM at 20 steps' does not hold on the embedded model: at "
        "20 steps DDPM's FID is below DDIM's; DDIM's deterministic ODE over-produces gray backgrounds, and its "
        "FID does not keep falling with more steps (measure with `bench claims --method ddim`)"))),
])
def test_ddim_beats_ddpm_ancestral_at_few_steps(steps):
    """Song et al. 2021 (DDIM), Table 1: eta=0 has a far lower FID than DDPM's ancestral sampler at 10-20 steps."""
    assert fid("ddim", steps) < fid("ddpm", steps)


def test_fast_solvers_at_20_nfe_are_as_good_as_ddim_at_50():
    """Lu et al. 2022b (DPM-Solver++) and Zhao et al. 2023 (UniPC): 10-20 NFE reach DDIM's 50-step quality."""
    ddim50 = fid("ddim", 50)
    best = min(fid("dpmsolver++", 20), fid("unipc", 20))
    assert measure("dpmsolver++", 20)["nfe"] == 20 and measure("unipc", 20)["nfe"] == 20
    assert best <= ddim50 * 1.10  # "at least as good", within the seed-to-seed spread at 256 samples


def test_second_order_beats_first_order_at_equal_nfe():
    """Lu et al. 2022 (DPM-Solver), section 3: the 2nd-order solver beats the 1st-order one (DDIM) at equal NFE."""
    first = measure("dpmsolver++", 10, solver_order=1)
    second = measure("dpmsolver++", 10, solver_order=2)
    assert first["nfe"] == second["nfe"] == 10
    assert second["fid"] < first["fid"]


def test_zero_terminal_snr_reaches_darker_images():
    """Lin et al. 2023, section 3: with zero terminal SNR (v-prediction, trailing spacing) the darkest
    samples get darker; the standard schedule cannot reach the black backgrounds."""
    standard = measure("ddim", 50, metrics=("brightness",))
    zero_snr = measure("ddim", 50, model="embedded-ddpm-zsnr", metrics=("brightness",), timestep_spacing="trailing")
    assert zero_snr["brightness_p01"] < standard["brightness_p01"]
