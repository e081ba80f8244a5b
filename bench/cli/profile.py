"""`bench profile`: per-device latency of full-size architectures (no checkpoints), and the harness's own cost."""

from __future__ import annotations

import json
from pathlib import Path

from bench.cli.options import non_negative_int, positive_int
from bench.errors import BenchError


def add_parser(sub, argv: list[str]) -> None:
    from bench.profile import ARCHS, HarnessBenchmark, LatencyProfile, SweepBenchmark
    from bench.runtime import ATTENTION
    from bench.spec import DTYPES

    p = sub.add_parser("profile", help="latency of full-size architectures; the harness's own overhead",
                       description="Latency without checkpoints (random weights), and benchmarks of the harness.")
    psub = p.add_subparsers(dest="profile_command", metavar="ACTION")
    d = LatencyProfile()
    lat = psub.add_parser(
        "latency", help="per-call latency of an architecture built from its config with random weights",
        description="Time one denoiser call of a full-size architecture with random weights: warm-up calls left "
        "out, device synchronised, CUDA events on a GPU, median and spread over the timed calls. Example: bench "
        "profile latency --arch sd15-unet --resolution 512 --dtype float16 --compile")
    lat.add_argument("--arch", choices=sorted(ARCHS), default=d.arch, help=f"architecture (default: {d.arch})")
    lat.add_argument("--resolution", type=positive_int, default=d.resolution,
                     help=f"image resolution; latent models see 1/8 of it (default: {d.resolution})")
    lat.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                     help=f"images per call; classifier-free guidance is batch 2 per image (default: {d.batch_size})")
    lat.add_argument("--dtype", choices=DTYPES, default=d.dtype, help=f"(default: {d.dtype})")
    lat.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    lat.add_argument("--attention", choices=ATTENTION, default=d.attention, help=f"(default: {d.attention})")
    lat.add_argument("--compile", action="store_true", help="torch.compile the module (the first call compiles)")
    lat.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    lat.add_argument("--warmup", type=non_negative_int, default=d.warmup, help=f"untimed calls (default: {d.warmup})")
    lat.add_argument("--iters", type=positive_int, default=d.iters, help=f"timed calls, at least 10 (default: {d.iters})")
    lat.add_argument("--seed", type=non_negative_int, default=d.seed, help="random weights and inputs")
    lat.add_argument("--json", metavar="FILE", help="also write the protocol and values as JSON")
    lat.add_argument("--record", action="store_true", help="record an MLflow run (experiment diffbench-latency)")
    lat.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    lat.set_defaults(func=latency)
    h = HarnessBenchmark()
    har = psub.add_parser(
        "harness", help="harness overhead, throughput against DDIMPipeline, metric phase against torch-fidelity",
        description="Measure, in this process, on the embedded pixel DDPM with DDIM: sampling-phase wall time "
        "against time inside the denoiser (bound: at most 3%% more); throughput against diffusers' DDIMPipeline "
        "making the same images (at least 1.0); the metric phase against torch-fidelity's calculate_metrics on the "
        "same images (at most 1.0); a metric phase with cached reference features against the first (at least "
        "10x faster); a whole run's time after its last batch (features streamed while sampling) against "
        "calculate_metrics on its images (at most 0.2). Exit 3 if a bound does not hold. Run it with OMP_NUM_THREADS=1 on a quiet machine.")
    har.add_argument("--num-samples", "-n", type=positive_int, default=h.num_samples, help=f"(default: {h.num_samples})")
    har.add_argument("--steps", type=positive_int, default=h.steps, help=f"DDIM steps (default: {h.steps})")
    har.add_argument("--batch-size", type=positive_int, default=h.batch_size, help=f"(default: {h.batch_size})")
    har.add_argument("--repeats", type=positive_int, default=h.repeats,
                     help=f"interleaved repetitions; medians are reported (default: {h.repeats})")
    har.add_argument("--only", choices=("sampling", "metrics"), help="one of the two groups")
    har.add_argument("--json", metavar="FILE", help="also write the values as JSON")
    har.set_defaults(func=harness)
    sw = SweepBenchmark()
    swp = psub.add_parser(
        "sweep", help="bench sweep's wall time against its cells' work; Ray workers against the local executor",
        description=f"Run `bench sweep` over {sw.cells} small cells ({', '.join(sw.methods)} x steps "
        f"{', '.join(map(str, sw.steps))} x {sw.seeds} seeds, {sw.num_samples} samples each, embedded pixel DDPM) as a "
        "new process and compare its wall time with the sum of its cells' sampling and metric seconds (bound: at "
        "most 1.15); then the same sweep on a local Ray cluster of one-CPU workers against the local executor with "
        "one thread (bound: at least 1.6 times the throughput) and with all cores. Exit 3 if a bound does not hold. Run it alone on a quiet machine.")
    swp.add_argument("--num-samples", "-n", type=positive_int, default=sw.num_samples,
                     help=f"samples per cell (default: {sw.num_samples}; at least 128: FID)")
    swp.add_argument("--seeds", type=positive_int, default=sw.seeds, help=f"seeds per configuration (default: {sw.seeds})")
    swp.add_argument("--ray-workers", type=non_negative_int, default=sw.ray_workers,
                     help=f"one-CPU Ray workers; 0 leaves the Ray comparison out (default: {sw.ray_workers})")
    swp.add_argument("--json", metavar="FILE", help="also write the values as JSON")
    swp.set_defaults(func=sweep)


def latency(args) -> int:
    from bench.profile import LatencyProfile, measure_latency

    profile = LatencyProfile(arch=args.arch, resolution=args.resolution, batch_size=args.batch_size, dtype=args.dtype,
                             device=args.device, attention=args.attention, compile=args.compile,
                             channels_last=args.channels_last, warmup=args.warmup, iters=args.iters, seed=args.seed)
    result = measure_latency(profile)
    proto, v, env = result["protocol"], result["values"], result["environment"]
    runtime = proto["runtime"]
    print(f"latency profile: {profile.arch} at {profile.resolution}x{profile.resolution}, batch {profile.batch_size}, "
          f"{profile.dtype}, {proto['device']} ({env['device_name']}, {env['torch_threads']} threads)")
    print(f"  call            {proto['call']}")
    print(f"  attention       {profile.attention} ({', '.join(runtime['attention_processors']) or 'no attention'}); "
          f"compile {'on' if profile.compile else 'off'}; channels_last {'on' if profile.channels_last else 'off'}")
    print(f"  per call        {v['latency_per_call_ms']:.3f} ms median (IQR {v['latency_per_call_ms_p25']:.3f}-"
          f"{v['latency_per_call_ms_p75']:.3f}, min {v['latency_per_call_ms_min']:.3f}, max "
          f"{v['latency_per_call_ms_max']:.3f}; {profile.iters} timed after {profile.warmup} warm-up, {proto['timing']})")
    print(f"  per image       {v['latency_per_image_ms']:.3f} ms")
    print(f"  first call      {v['first_call_s']:.3f} s")
    print(f"  parameters      {v['params'] / 1e6:.2f}M")
    if "peak_memory_mb" in v:
        print(f"  peak memory     {v['peak_memory_mb']:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    if args.record:
        from bench.runner import git_sha
        from bench.tracking import Tracker

        tracker = Tracker(args.tracking_uri, "diffbench-latency")
        tracker.check()
        tags = {"kind": "latency-profile", "arch": profile.arch, "diffbench_git_sha": git_sha(),
                **{k: str(val) for k, val in env.items()}}
        name = f"{profile.arch}-{profile.resolution}-{profile.dtype}{'-compiled' if profile.compile else ''}"
        with tracker.run(name, {"profile": proto}, tags) as tracked:
            tracked.log_metrics(v)
        print(f"  MLflow run      {tracked.run_id} ({tracker.uri})")
    return 0


def harness(args) -> int:
    import os

    from bench.profile import HarnessBenchmark, run_harness_benchmarks

    bench = HarnessBenchmark(num_samples=args.num_samples, steps=args.steps, batch_size=args.batch_size,
                             repeats=args.repeats)
    if bench.num_samples < 128 and args.only != "sampling":
        raise BenchError("the metric benchmarks compute FID: --num-samples must be at least 128")
    result = run_harness_benchmarks(bench, (args.only,) if args.only else ("sampling", "metrics"))
    print(f"harness benchmarks: embedded-ddpm, DDIM {bench.steps} steps, {bench.num_samples} samples in batches of "
          f"{bench.batch_size}, medians of {bench.repeats} interleaved repeats; load average (1, 5, 15 min) "
          f"{', '.join(f'{x:.2f}' for x in result['environment']['load_average_before'])} before, "
          f"{', '.join(f'{x:.2f}' for x in result['environment']['load_average'])} after, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    labels = {
        "harness_overhead": ("harness overhead", "sampling wall / time in denoiser - 1",
                             lambda x: f"{100 * x:.2f}%"),
        "throughput_ratio": ("throughput ratio", "DDIMPipeline seconds / bench seconds, same images",
                             lambda x: f"{x:.3f}"),
        "metric_phase_ratio": ("metric phase ratio", "bench fid+kid seconds / torch-fidelity calculate_metrics",
                               lambda x: f"{x:.3f}"),
        "cached_metric_speedup": ("cached speedup", "first metric phase / repeat with cached reference features",
                                  lambda x: f"{x:.1f}x"),
        "streamed_metric_ratio": ("streamed metrics", "a run's seconds after its last batch / calculate_metrics",
                                  lambda x: f"{x:.3f}"),
    }
    return report_checks(result, labels, args.json)


def report_checks(result: dict, labels: dict, json_path: str | None) -> int:
    """Print each bound's check (label, value, bound, verdict, what it measures) then the other values; write the
    result as JSON if asked. 3 if a bound does not hold, else 0. ``labels``: key -> (label, what, format)."""
    failed = False
    for key, (label, what, fmt) in labels.items():
        if key in result["checks"]:
            check = result["checks"][key]
            bound = f"{'<=' if check['kind'] == 'max' else '>='} {fmt(check['bound'])}"
            print(f"  {label:<20} {fmt(check['value']):>8}  ({bound}: {'holds' if check['holds'] else 'DOES NOT HOLD'}; "
                  f"{what})")
            failed |= not check["holds"]
    values = result["values"]
    for key in sorted(set(values) - set(labels)):
        print(f"  {key:<36} {values[key]:.6g}")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 3 if failed else 0


def sweep(args) -> int:
    import os

    from bench.profile import SweepBenchmark, run_sweep_benchmarks

    if args.num_samples < 128:
        raise BenchError("the sweep benchmark's cells compute FID: --num-samples must be at least 128")
    bench = SweepBenchmark(num_samples=args.num_samples, seeds=args.seeds, ray_workers=args.ray_workers)
    result = run_sweep_benchmarks(bench)
    env = result["environment"]
    print(f"sweep benchmarks: {bench.cells} cells ({', '.join(bench.methods)} x steps {', '.join(map(str, bench.steps))} "
          f"x {bench.seeds} seeds), {bench.num_samples} samples each in batches of {bench.batch_size}, metrics "
          f"{', '.join(bench.metrics)}; load average {', '.join(f'{x:.2f}' for x in env['load_average_before'])} "
          f"before, {', '.join(f'{x:.2f}' for x in env['load_average'])} after, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    ratio = lambda x: f"{x:.3f}"  # noqa: E731
    labels = {"sweep_overhead_ratio": ("sweep overhead", "bench sweep wall / sum of cells' sampling + metric seconds",
                                       ratio),
              "ray_throughput_ratio": ("Ray throughput", f"local executor (one thread) wall / {bench.ray_workers} "
                                                         f"one-CPU Ray workers' wall", ratio)}
    return report_checks(result, labels, args.json)
