"""`bench run`: one method, one model, one data set; samples, metrics and an MLflow run."""

from __future__ import annotations

import sys

from bench.cli import options
from bench.spec import RunSpec, load_spec_file, resolve_spec


def add_parser(sub, argv: list[str]) -> None:
    p = sub.add_parser(
        "run",
        help="run one method and record it in MLflow",
        description="Generate samples with a method, compute the metrics against the data set's reference set, "
        "and record everything as an MLflow run. Example: bench run --method ddim --steps 50. Sharded over K "
        "processes: torchrun --nproc-per-node K -m bench run ... (same samples, one MLflow run).",
    )
    d = RunSpec()
    p.add_argument("--method", help=f"method adapter (default: {d.method}; see `bench ls methods`)")
    p.add_argument("--steps", type=options.positive_int, help=f"sampling steps (default: {d.steps})")
    p.add_argument("--seed", type=options.non_negative_int, help=f"run seed (default: {d.seed})")
    p.add_argument("--output", help="output folder (default: bench-runs/<method>-<protocol hash>)")
    p.add_argument("--run-name", help="MLflow run name")
    p.add_argument("--resume", action="store_true",
                   help="finish a run that was killed: keep its complete shards, make the rest, and finish the same "
                   "MLflow run (refused if the output folder holds another protocol's run)")
    options.add_spec_options(p)
    method = options.methods_named(argv, d.method)[0] if argv[:1] == ["run"] else d.method
    dests = options.add_method_options(p, method) if argv[:1] == ["run"] else []
    p.set_defaults(func=lambda args: run(args, dests))


def spec_from_args(args, dests: list[str]) -> RunSpec:
    file_values = load_spec_file(args.config) if args.config else {}
    cli = {
        **options.spec_values(args),
        "method": args.method,
        "steps": args.steps,
        "seed": args.seed,
        "output": args.output,
        "run_name": args.run_name,
        "method_args": options.method_values(args, dests) or None,
    }
    return resolve_spec(cli, file_values)


def print_config(plan) -> None:
    spec = plan.spec
    print("diffbench run")
    rows = [
        ("method", f"{spec.method} {spec.method_args}"),
        ("model", f"{plan.model.name} (sha256 {plan.model.digest[:12]})"),
        ("dataset", f"{plan.reference.name} (features: {plan.reference.feature_extractor})"),
        ("steps", spec.steps), ("samples", spec.num_samples), ("batch size", spec.batch_size),
        ("seed", spec.seed), ("device", f"{spec.device} {spec.dtype}"), ("metrics", ",".join(spec.metrics)),
        ("output", plan.output), ("protocol hash", plan.protocol_hash),
    ]
    for key, value in rows:
        print(f"  {key:<14} {value}")
    sys.stdout.flush()


def training_rows(v: dict) -> list[tuple[str, str]]:
    """The training budget and the prior drift (methods that train in prepare)."""
    rows = []
    if "train_steps" in v:
        rows.append(("training", f"{int(v['train_steps'])} steps, {int(v['train_params']):,} trained params, "
                                 f"{v['train_seconds']:.1f} s, peak {v['train_peak_memory_bytes'] / 2**20:.0f} MB, "
                                 f"saved {v['train_saved_bytes'] / 1024:.1f} KB"))
    if "prior_drift" in v:
        held = (f"; held-out attribute in {v['prior_heldout_rate']:.3f} of them (before {v['prior_heldout_rate_base']:.3f})"
                if "prior_heldout_rate" in v else "")
        rows.append(("prior drift", f"FID {v['prior_drift']:.3f} (class-prompt samples, before vs after){held}"))
    return rows


# values with a row of their own in format_results (composites: KID with its spread, latency with its IQR, ...)
COMPOSED = ("fid", "kid_mean", "clip_score", "attr_acc_all", "attr_acc_mean", "latency_per_image_ms",
            "latency_per_call_ms", "throughput_images_per_s", "nfe", "peak_memory_mb", "sampling_seconds",
            "denoiser_seconds")


def declared_rows(v: dict, metrics) -> list[tuple[str, str]]:
    """A row per other ranked value the run's metrics declare (bench.outputs.Output): its label, its format;
    a ``{key}_real`` companion (the real images among themselves) and the per-edit-type breakdown beside it."""
    rows = []
    for metric in metrics:
        for out in metric.outputs:
            key = out.key
            if key.endswith("*") or key in COMPOSED or out.direction == "none" or key not in v:
                continue
            text = out.format(v[key])
            if f"{key}_real" in v:
                text += f" (real images among themselves {out.format(v[key + '_real'])})"
            types = sorted(k.split("/", 1)[1] for k in v if k.startswith(key + "/"))
            if types:
                text += " (" + ", ".join(f"{t} {out.format(v[f'{key}/{t}'])}" for t in types) + ")"
            rows.append((out.label, text))
    return rows


def format_results(result, tracker_uri: str) -> str:
    v = result.values
    ref = result.plan.reference
    rows: list[tuple[str, str]] = []
    tag = f"{ref.feature_extractor}, {ref.name}"
    if "fid" in v:
        rows.append((f"FID [{tag}]", f"{v['fid']:.3f}"))
    if "kid_mean" in v:
        rows.append((f"KID [{tag}]", f"{v['kid_mean']:.4f} +- {v['kid_std']:.4f} (std over subsets)"))
    if "clip_score" in v:
        rows.append((f"CLIP score [{ref.clip_backbone}, 100*max(cos,0)]", f"{v['clip_score']:.3f}"))
    if "attr_acc_all" in v:
        per = ", ".join(f"{k[9:]} {v[k]:.3f}" for k in sorted(v) if k.startswith("attr_acc_") and k not in ("attr_acc_all", "attr_acc_mean"))
        rows.append(("attribute accuracy", f"{v['attr_acc_all']:.3f} all correct ({per})"))
    rows += declared_rows(v, result.plan.metrics.values())
    rows += training_rows(v)
    if "latency_per_image_ms" in v:
        iqr = (f", IQR {v['latency_per_image_ms_p25']:.2f}-{v['latency_per_image_ms_p75']:.2f}"
               if "latency_per_image_ms_p25" in v else "")
        rows.append(("latency / image", f"{v['latency_per_image_ms']:.2f} ms (median of {int(v['timed_batches'])} batches{iqr})"))
        call_iqr = (f" (IQR {v['latency_per_call_ms_p25']:.2f}-{v['latency_per_call_ms_p75']:.2f})"
                    if "latency_per_call_ms_p25" in v else "")
        rows.append(("latency / denoiser call", f"{v['latency_per_call_ms']:.2f} ms{call_iqr}"))
        rows.append(("NFE", f"{v['nfe']:g}"))
    if "peak_memory_mb" in v:
        rows.append(("peak memory", f"{v['peak_memory_mb']:.0f} MB"))
    rows.append(("samples", f"{int(v['num_samples'])}"))
    x = result.extra
    if x.get("processes", 1) > 1 or x.get("reused_shards"):
        reused = f"{x['reused_shards']} reused from the interrupted run; " if x["reused_shards"] else ""
        rows.append(("shards", f"{x['shards']} ({reused}{x['shards'] - x['reused_shards']} made by "
                     f"{x['processes']} process{'es' if x['processes'] > 1 else ''})"))
    from bench.runner import device_name

    rows.append(("device", f"{result.plan.spec.device} ({device_name(result.plan.spec.device)})"))
    rows.append(("samples sha256", result.samples_sha256[:16]))
    rows.append(("output", str(result.output)))
    rows.append(("MLflow run", f"{result.run_id} ({tracker_uri})"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {val}" for k, val in rows)


def run(args, dests: list[str]) -> int:
    from bench.distributed import from_environment
    from bench.runner import execute, plan_run
    from bench.tracking import Tracker

    spec = spec_from_args(args, dests)
    shards = from_environment(spec.device)  # torchrun / accelerate launch: this process's rank; else one process
    try:
        tracker = Tracker(args.tracking_uri, spec.experiment)
        if shards.lead:  # the other processes never touch the store
            tracker.check()
        plan = plan_run(spec)
        if shards.lead:
            print_config(plan)
        result = execute(plan, tracker, progress=not args.no_progress, resume=args.resume, shards=shards)
    finally:
        shards.close()
    if result is not None:
        print("results")
        print(format_results(result, tracker.uri))
    return 0
