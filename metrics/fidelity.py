"""FID and KID through torch-fidelity's stages: features -> statistics -> score.

The feature extractor is the data set's: ``inception-v3-compat`` (torch-fidelity's
port of the TF Inception, pool3, 2048-d) for real data sets, ``shapes-cnn16``
(64-d) for the shapes world. Features are accumulated in float64 before the
statistics; the trace of sqrt(S1 S2) is torch-fidelity's sum of square roots of
the eigenvalues of S1 S2.
"""

from __future__ import annotations

from typing import Any

from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

from bench.errors import BenchError
from bench.evaluation import FEATURE_BATCH_SIZE
from bench.extractors import extractor_for
from bench.interfaces import Metric, ReferenceSet
from bench.outputs import Output

KEY_FID = "fid"
KEY_KID_MEAN = "kid_mean"
KEY_KID_STD = "kid_std"
KID_SUBSETS = 100
KID_SUBSET_SIZE_MAX = 1000


class FeatureMetric(Metric):
    """Shared protocol of the metrics computed on the data set's feature extractor."""

    def protocol(self, spec, reference: ReferenceSet) -> dict[str, Any]:
        info = extractor_for(reference)
        return {
            "feature_extractor": info.name,
            "feature_layer": info.layer,
            "feature_dim": info.dim,
            "extractor_digest": info.digest(),
            "resize": info.resize,
            "reference": reference.identity(),
            "num_samples": spec.num_samples,
            "embedded": reference.embedded,
            # the extractor's batches (its reductions' order): bench.evaluation.shard_features
            "sample_features": f"per shard, in chunks of {FEATURE_BATCH_SIZE}",
        }

    def sample_features(self, spec, reference: ReferenceSet) -> tuple[tuple[str, str], ...]:
        info = extractor_for(reference)
        return ((info.name, info.layer),)

    def check(self, spec, reference: ReferenceSet) -> None:
        if not reference.has_images:
            raise BenchError(f"{self.name} needs reference images, and data set {reference.name} has only prompts; "
                             f"leave {self.name} out of --metrics or use a data set with images")
        info = extractor_for(reference)
        info.preflight()
        info.digest()


class FID(FeatureMetric):
    name = "fid"
    summary = "Frechet distance between feature Gaussians (Heusel et al. 2017), via torch-fidelity"
    outputs = (Output(KEY_FID, "FID", "lower", ".3f", "fid", 0.10),)

    def check(self, spec, reference: ReferenceSet) -> None:
        super().check(spec, reference)
        dim = extractor_for(reference).dim
        if spec.num_samples < 2 * dim:
            raise BenchError(
                f"FID on {dim}-d {reference.feature_extractor} features needs at least {2 * dim} samples "
                f"(twice the feature dimension, for a full-rank covariance); got --num-samples {spec.num_samples}"
            )

    def compute(self, ctx) -> dict[str, float]:
        info = extractor_for(ctx.reference)
        gen = ctx.sample_features(info.name, info.layer)
        ref = ctx.reference_features(info.name, info.layer, info.digest())
        score = fid_statistics_to_metric(fid_features_to_statistics(gen), fid_features_to_statistics(ref), verbose=False)
        return {KEY_FID: float(score[KEY_METRIC_FID])}


def kid_subset_size(num_samples: int) -> int:
    return min(KID_SUBSET_SIZE_MAX, num_samples // 2)


class KID(FeatureMetric):
    name = "kid"
    summary = "Kernel distance, unbiased at small N (Binkowski et al. 2018), mean and std over subsets"
    outputs = (
        Output(KEY_KID_MEAN, "KID x 1e3", "lower", ".3f", "kid", 0.25, scale=1e3),
        Output(KEY_KID_STD, "KID std over subsets x 1e3", "none", ".3f", "kid", None, scale=1e3),
    )

    def protocol(self, spec, reference: ReferenceSet) -> dict[str, Any]:
        return {
            **super().protocol(spec, reference),
            "kid_subsets": KID_SUBSETS,
            "kid_subset_size": kid_subset_size(spec.num_samples),
            "kid_kernel": "poly degree 3, coef0 1, gamma 1/d",
            "kid_rng_seed": 2020,
        }

    def check(self, spec, reference: ReferenceSet) -> None:
        super().check(spec, reference)
        if kid_subset_size(spec.num_samples) < 2:
            raise BenchError(f"KID needs at least 4 samples (two subsets of two); got --num-samples {spec.num_samples}")

    def compute(self, ctx) -> dict[str, float]:
        info = extractor_for(ctx.reference)
        gen = ctx.sample_features(info.name, info.layer)
        ref = ctx.reference_features(info.name, info.layer, info.digest())
        out = kid_features_to_metric(
            gen, ref, kid_subsets=KID_SUBSETS, kid_subset_size=kid_subset_size(len(gen)), rng_seed=2020, verbose=False
        )
        return {KEY_KID_MEAN: float(out[KEY_METRIC_KID_MEAN]), KEY_KID_STD: float(out[KEY_METRIC_KID_STD])}
