"""`bench evaluate OUTPUT`: recompute a finished run's sample metrics from its saved shards, no sampling."""

from __future__ import annotations

import json
from pathlib import Path

from bench.errors import BenchError

SAMPLE_METRICS = ("fid", "kid")  # the ones that depend on the samples alone


def add_parser(sub, argv: list[str]) -> None:
    p = sub.add_parser("evaluate", help="recompute FID/KID of a run folder from its saved samples",
                       description="Recompute the sample metrics of a run from OUTPUT/samples with the protocol in "
                       "OUTPUT/config.json, and compare with OUTPUT/results.json. No model is loaded.")
    p.add_argument("output", help="a run's output folder")
    p.add_argument("--metrics", default=",".join(SAMPLE_METRICS), help="comma-separated (default: fid,kid)")
    p.set_defaults(func=run)


def load_samples(folder: Path, spec, protocol_hash: str):
    """All samples of a run folder, from complete shards only (bench.shards); shards of runs made before sidecars
    existed are read as they are."""
    import numpy as np

    from bench.runner import batch_range, num_batches
    from bench.shards import ShardStore

    store = ShardStore(folder, protocol_hash)
    shards = []
    for k in range(num_batches(spec)):
        if store.path(k).exists() and not store.sidecar(k).exists() and not (folder / "run.json").exists():
            try:  # a run folder older than sidecars
                shards.append(np.load(store.path(k), allow_pickle=False))
            except (ValueError, OSError, EOFError) as exc:
                raise BenchError(f"sample shard {k} in {folder} is unreadable: {exc}") from None
            continue
        loaded = store.load(k, batch_range(spec, k))
        if loaded is None:
            raise BenchError(f"sample shard {k} in {folder} is missing, unreadable or incomplete; finish the run "
                             f"with `bench run ... --resume`")
        shards.append(loaded[0])
    return np.concatenate(shards)


def run(args) -> int:
    import torch

    from bench.catalog import DATASETS, METRICS
    from bench.evaluation import EvalContext
    from bench.spec import RunSpec

    from bench.spec import read_small_file

    folder = Path(args.output)
    if not folder.is_dir():
        raise BenchError(f"{folder} is not a run folder (not a folder)")
    try:
        config = json.loads(read_small_file(folder / "config.json", "run config", 16 << 20))
    except json.JSONDecodeError as exc:
        raise BenchError(f"{folder} is not a run folder (config.json: {exc})") from None
    if (not isinstance(config, dict) or not isinstance(config.get("spec"), dict)
            or not isinstance(config.get("protocol_hash"), str) or not isinstance(config.get("protocol"), dict)
            or not isinstance(config["protocol"].get("metrics", {}), dict)):
        raise BenchError(f"{folder}/config.json is not a run's config (a mapping with spec, protocol and "
                         f"protocol_hash)")
    try:
        spec = RunSpec(**{**config["spec"], "metrics": tuple(config["spec"].get("metrics") or ()) or None})
    except TypeError as exc:
        raise BenchError(f"{folder}/config.json has an invalid spec: {exc}") from None
    names = [m.strip() for m in args.metrics.split(",") if m.strip()]
    bad = [m for m in names if m not in SAMPLE_METRICS]
    if bad:
        raise BenchError(f"only {', '.join(SAMPLE_METRICS)} can be recomputed from samples, not {', '.join(bad)}")
    samples = load_samples(folder, spec, config["protocol_hash"])
    if len(samples) != spec.num_samples:
        raise BenchError(f"{folder} holds {len(samples)} samples but the run asked for {spec.num_samples}")
    if spec.dataset is None:
        raise BenchError(f"{folder}/config.json names no data set")
    reference = DATASETS.get(spec.dataset)()
    ctx = EvalContext(spec, torch.from_numpy(samples).permute(0, 3, 1, 2).contiguous(), reference,
                      torch.device(spec.device if spec.device == "cpu" or torch.cuda.is_available() else "cpu"))
    from bench.evaluation import metric_threads

    values: dict[str, float] = {}
    for name in names:
        metric = METRICS.get(name)()
        if metric.protocol(spec, reference) != config["protocol"]["metrics"].get(name, metric.protocol(spec, reference)):
            raise BenchError(f"the {name} protocol changed since this run (extractor or reference set); refusing to compare")
        with metric_threads():
            values.update(metric.compute(ctx))
    recorded = {}
    if (folder / "results.json").exists():
        recorded = json.loads((folder / "results.json").read_text()).get("values", {})
    for key, value in values.items():
        before = recorded.get(key)
        note = "" if before is None else f"  (recorded {before:.6g}, {'same' if abs(before - value) <= 1e-9 * max(1, abs(value)) else 'DIFFERENT'})"
        print(f"  {key:<10} {value:.6g}{note}")
    return 0
