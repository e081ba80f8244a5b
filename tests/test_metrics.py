"""FID/KID through torch-fidelity against independent float64 computations; latency statistics."""

import numpy as np
import pytest
import scipy.linalg
import torch

from bench.datasets import Shapes16
from bench.errors import BenchError
from bench.evaluation import EvalContext, SamplingTimings
from bench.spec import RunSpec
from bench.extractors import extractor_for
from metrics.fidelity import FID, KID, kid_subset_size
from metrics.latency import Latency, timed_batches


def reference_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """Heusel et al. eq. 6 in float64 with scipy's matrix square root: an independent implementation."""
    f1, f2 = f1.astype(np.float64), f2.astype(np.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.fixture(scope="module")
def context():
    from bench.embedded.shapes import WorldConfig, render_set

    images, _ = render_set(77, range(400), WorldConfig(resolution=16))
    # perturb so the generated set differs from the reference distribution
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    x = (x.float() * 0.8 + 20).clamp(0, 255).to(torch.uint8)
    return EvalContext(RunSpec(num_samples=400), x, Shapes16(), torch.device("cpu"))


def test_fid_matches_an_independent_float64_computation(context):
    value = FID().compute(context)["fid"]
    info = extractor_for(context.reference)
    gen = context.sample_features(info.name, info.layer).numpy()
    ref = context.reference_features(info.name, info.layer, info.digest()).numpy()
    assert gen.dtype == np.float64 and gen.shape == (400, 64) and ref.shape == (10_000, 64)
    expected = reference_fid(gen, ref)
    assert abs(value - expected) / expected < 1e-6
    assert value > 0


def test_fid_of_a_set_against_itself_is_zero(context):
    info = extractor_for(context.reference)
    ref = context.reference_features(info.name, info.layer, info.digest()).numpy()
    assert abs(reference_fid(ref, ref)) < 1e-6


def test_reference_features_are_cached_on_disk(context, tmp_path, monkeypatch):
    from bench.files import cache_dir

    files = list((cache_dir() / "reference-features").glob("shapes16-shapes-cnn16-*.safetensors"))
    assert len(files) == 1
    fresh = EvalContext(context.spec, context.samples, context.reference, context.device)
    info = extractor_for(context.reference)
    monkeypatch.setattr(fresh, "_extract", lambda *a: pytest.fail("reference features were recomputed"))
    cached = fresh.reference_features(info.name, info.layer, info.digest())
    assert torch.equal(cached, context.reference_features(info.name, info.layer, info.digest()))


def test_damaged_cache_entry_is_recomputed(context):
    from bench.files import cache_dir

    path = next((cache_dir() / "reference-features").glob("shapes16-*.safetensors"))
    good = path.read_bytes()
    path.write_bytes(good[:100])
    try:
        fresh = EvalContext(context.spec, context.samples, context.reference, context.device)
        info = extractor_for(context.reference)
        feats = fresh.reference_features(info.name, info.layer, info.digest())
        assert feats.shape == (10_000, 64)
    finally:
        path.write_bytes(good)


def test_kid_is_near_zero_for_the_same_distribution_and_positive_otherwise(context):
    from bench.embedded.shapes import WorldConfig, render_set

    out = KID().compute(context)
    assert out["kid_mean"] > 0 and out["kid_std"] > 0
    same, _ = render_set(123, range(400), WorldConfig(resolution=16))
    ctx = EvalContext(context.spec, torch.from_numpy(same).permute(0, 3, 1, 2).contiguous(), context.reference,
                      context.device)
    same_kid = KID().compute(ctx)["kid_mean"]
    assert abs(same_kid) < 3 * KID().compute(ctx)["kid_std"]
    assert out["kid_mean"] > 10 * abs(same_kid)


def test_too_few_samples_for_fid_is_bad_input():
    with pytest.raises(BenchError, match="at least 128 samples"):
        FID().check(RunSpec(num_samples=100), Shapes16())
    FID().check(RunSpec(num_samples=128), Shapes16())
    assert kid_subset_size(1000) == 500 and kid_subset_size(5000) == 1000


def test_protocol_names_extractor_reference_and_digest():
    p = KID().protocol(RunSpec(num_samples=1000), Shapes16())
    assert p["feature_extractor"] == "shapes-cnn16" and p["embedded"] is True
    assert p["reference"]["name"] == "shapes16" and len(p["extractor_digest"]) == 64
    assert p["kid_subset_size"] == 500


def test_latency_leaves_out_warmup_and_takes_medians():
    t = SamplingTimings(batch_seconds=[10.0, 1.0, 3.0, 2.0], batch_sizes=[10, 10, 10, 10], batch_calls=[5, 5, 5, 5],
                        call_seconds=[[2.0] * 5, [0.2] * 5, [0.6] * 5, [0.4] * 5])
    ctx = EvalContext(RunSpec(warmup_batches=1), torch.zeros(0), Shapes16(), torch.device("cpu"), t)
    out = Latency().compute(ctx)
    assert out["latency_per_image_ms"] == pytest.approx(200.0)  # median of 100, 300, 200 ms per image
    assert out["latency_per_call_ms"] == pytest.approx(400.0)
    assert out["nfe"] == 5 and out["timed_batches"] == 3
    assert out["throughput_images_per_s"] == pytest.approx(30 / 6.0)
    assert list(timed_batches(1, 1)) == [0]  # a single batch is timed rather than nothing


def test_every_metric_declares_its_outputs():
    """Each registered metric declares key, label, direction, format, family and tolerance of every value."""
    from bench.catalog import METRICS
    from bench.outputs import DIRECTIONS, lookup

    for name in METRICS.names():
        outputs = METRICS.get(name).outputs
        assert outputs, f"metric {name} declares no outputs"
        keys = [o.key for o in outputs]
        assert len(keys) == len(set(keys)), name
        for o in outputs:
            assert o.label and o.direction in DIRECTIONS and format(1.5, o.fmt) and o.family, (name, o)
            if not o.key.endswith("*"):
                assert lookup(o.key) is not None
    for key, direction in (("fid", "lower"), ("clip_score", "higher"), ("attr_acc_color", "higher"),
                           ("bg_psnr/color", "higher"), ("structure_dist_shapes_cnn32", "lower"),
                           ("subject_sim_shapes_cnn32", "higher"), ("human_count", "higher")):
        assert lookup(key).direction == direction, key


def test_latency_values_are_all_declared():
    from bench.outputs import undeclared

    timings = SamplingTimings(batch_seconds=[1.0, 2.0], batch_sizes=[4, 4], batch_calls=[3, 3],
                              call_seconds=[[0.1] * 3, [0.2] * 3], peak_memory_bytes=2**20)
    ctx = EvalContext(spec=RunSpec(warmup_batches=0), samples=torch.zeros(8, 3, 16, 16, dtype=torch.uint8),
                      reference=Shapes16(), device=torch.device("cpu"), timings=timings)
    assert undeclared(Latency().compute(ctx), Latency.outputs) == []


def test_every_declared_claim_names_a_declared_output():
    """A claim's metric is a key some metric (or the run) declares: its direction and format come from there."""
    from bench.catalog import METHODS
    from bench.outputs import lookup

    for name in METHODS.names():
        for claim in getattr(METHODS.get(name), "claims", ()):
            assert lookup(claim.metric) is not None, (name, claim.id, claim.metric)
