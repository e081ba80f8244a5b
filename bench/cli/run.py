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
        "and record everything as an MLflow run. Example: bench run --method ddim --steps 50",
    )
    d = RunSpec()
    p.add_argument("--method", help=f"method adapter (default: {d.method}; see `bench ls methods`)")
    p.add_argument("--steps", type=options.positive_int, help=f"sampling steps (default: {d.steps})")
    p.add_argument("--seed", type=options.non_negative_int, help=f"run seed (default: {d.seed})")
    p.add_argument("--output", help="output folder (default: bench-runs/<method>-<protocol hash>)")
    p.add_argument("--run-name", help="MLflow run name")
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
    if "latency_per_image_ms" in v:
        rows.append(("latency / image", f"{v['latency_per_image_ms']:.2f} ms (median of {int(v['timed_batches'])} batches)"))
        rows.append(("latency / denoiser call", f"{v['latency_per_call_ms']:.2f} ms"))
        rows.append(("NFE", f"{v['nfe']:g}"))
    if "peak_memory_mb" in v:
        rows.append(("peak memory", f"{v['peak_memory_mb']:.0f} MB"))
    rows.append(("samples", f"{int(v['num_samples'])}"))
    from bench.runner import device_name

    rows.append(("device", f"{result.plan.spec.device} ({device_name(result.plan.spec.device)})"))
    rows.append(("samples sha256", result.samples_sha256[:16]))
    rows.append(("output", str(result.output)))
    rows.append(("MLflow run", f"{result.run_id} ({tracker_uri})"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {val}" for k, val in rows)


def run(args, dests: list[str]) -> int:
    from bench.runner import execute, plan_run
    from bench.tracking import Tracker

    spec = spec_from_args(args, dests)
    tracker = Tracker(args.tracking_uri, spec.experiment)
    tracker.check()
    plan = plan_run(spec)
    print_config(plan)
    result = execute(plan, tracker, progress=not args.no_progress)
    print("results")
    print(format_results(result, tracker.uri))
    return 0
