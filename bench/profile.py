"""Latency of full-size architectures without checkpoints, and the harness's own cost (`bench profile`).

Latency does not depend on weight values, so ``latency`` builds an architecture from its config (in bench/archs,
as published in the diffusers layouts: the SD-1.5 UNet and VAE of runwayml/stable-diffusion-v1-5, the SDXL base
UNet, the SD3-medium MMDiT and the FLUX.1-dev transformer; each file's ``_source`` names its origin) with random
weights and times one denoiser call with the inputs its pipeline passes (SDXL: ``added_cond_kwargs``, pooled text
embedding and the 6 micro-conditioning time ids; SD3: text context and pooled projections; FLUX: 2x2-packed latent
tokens, their position ids and the text's, pooled projections and, for dev, the guidance value): warm-up calls left out, the device synchronised, CUDA events on a
GPU, median and spread (quartiles, min, max) over at least 10 timed calls. Everything that can change the number
(architecture, resolution, batch, dtype, device, attention kernel, torch.compile, channels-last, warm-up) is in
the profile, recorded with the result.

``harness`` measures, in one process, what `bench run` costs beyond the network on the embedded pixel DDPM:
sampling-phase wall time against time inside the denoiser; throughput against diffusers' DDIMPipeline making the
same images; the metric phase against torch-fidelity's calculate_metrics on the same images, and the metric
phase with the reference features cached against the first one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bench.errors import BenchError
from bench.runtime import ATTENTION, attention_context, check_attention, configure
from bench.spec import DTYPES, RunSpec

ARCHS_DIR = Path(__file__).resolve().parent / "archs"
MIN_TIMED = 10


@dataclass(frozen=True)
class Arch:
    config: str  # file in bench/archs ("" for the embedded pixel DDPM's own config)
    call: str  # what one timed call is
    downsample: int  # input side = resolution / downsample (8 for latent models)
    multiple: int  # resolutions it takes are multiples of this
    text_tokens: int = 77  # length of the text context its pipeline passes


ARCHS = {
    "sd15-unet": Arch("sd15-unet.json", "UNet2DConditionModel forward: one denoising step, text context 77x768", 8, 64),
    "sd15-vae-decoder": Arch("sd15-vae.json", "AutoencoderKL.decode of a latent", 8, 8),
    "embedded-ddpm": Arch("", "UNet2DModel forward of the embedded pixel DDPM's config (random weights)", 1, 4),
    # StableDiffusionXLPipeline: both CLIP encoders' 77 tokens, concatenated in width
    "sdxl-unet": Arch("sdxl-unet.json", "UNet2DConditionModel forward of SDXL base: one denoising step, text context "
                      "77x2048, added_cond_kwargs (pooled text embedding, 6 micro-conditioning time ids)", 8, 32),
    # StableDiffusion3Pipeline: 77 CLIP tokens then max_sequence_length = 256 T5 tokens
    "sd3-medium-transformer": Arch("sd3-medium-transformer.json", "SD3Transformer2DModel forward of SD3 medium: one "
                                   "step, text context 333x4096 (77 CLIP + 256 T5 tokens), pooled projections", 8, 16,
                                   text_tokens=77 + 256),
    # FluxPipeline: max_sequence_length = 512 T5 tokens (FLUX.1-dev's maximum)
    "flux1-transformer": Arch("flux1-dev-transformer.json", "FluxTransformer2DModel forward of FLUX.1-dev: one step, "
                              "2x2-packed latent tokens, text context 512x4096 (T5), pooled projections, guidance",
                              8, 16, text_tokens=512),
}


@dataclass(frozen=True)
class LatencyProfile:
    """The latency protocol of one measurement."""

    arch: str = "sd15-unet"
    resolution: int = 512  # image resolution; latent architectures see resolution / 8
    batch_size: int = 1
    dtype: str = "float32"
    device: str = "auto"
    attention: str = "sdpa"
    compile: bool = False
    channels_last: bool = False
    warmup: int = 3  # calls left out (the first compiles under torch.compile)
    iters: int = 20  # timed calls
    seed: int = 0  # random weights and inputs

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise BenchError(f"unknown architecture {self.arch!r}; known: {', '.join(ARCHS)}")
        if self.dtype not in DTYPES:
            raise BenchError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.attention not in ATTENTION:
            raise BenchError(f"attention must be one of {', '.join(ATTENTION)}, got {self.attention!r}")
        if self.iters < MIN_TIMED:
            raise BenchError(f"--iters {self.iters}: the latency protocol times at least {MIN_TIMED} calls")
        if self.compile and self.warmup < 1:
            raise BenchError("--compile needs at least one warm-up call (the first call compiles)")
        if self.resolution < 1 or self.resolution % ARCHS[self.arch].multiple:
            raise BenchError(f"--resolution {self.resolution}: {self.arch} takes multiples of {ARCHS[self.arch].multiple}")
        if self.batch_size < 1 or self.warmup < 0:
            raise BenchError("--batch-size must be positive and --warmup non-negative")


def _config(arch: str) -> tuple[str, dict[str, Any]]:
    if arch == "embedded-ddpm":
        from bench.models import EMBEDDED_WEIGHTS  # lazy: bench.cli imports this module at startup

        data = json.loads((EMBEDDED_WEIGHTS / "pixel-ddpm" / "unet" / "config.json").read_text())
    else:
        data = json.loads((ARCHS_DIR / ARCHS[arch].config).read_text())
    return data["_class_name"], {k: v for k, v in data.items() if not k.startswith("_")}


def build(profile: LatencyProfile):
    """The module with random weights on the device and dtype, its options applied, and a call on fixed inputs."""
    import diffusers  # lazy: bench.cli imports this module at startup
    import torch

    from bench.runner import resolve_device

    device = resolve_device(profile.device)
    dtype = getattr(torch, profile.dtype)
    if device.type == "cpu" and dtype == torch.float16:
        raise BenchError("--dtype float16 is not supported on the CPU; use float32 or bfloat16")
    check_attention(profile.attention, device, dtype)
    class_name, config = _config(profile.arch)
    check_memory(profile, device, dtype)
    torch.manual_seed(profile.seed)
    module = getattr(diffusers, class_name).from_config(config).to(device=device).eval()
    if dtype != torch.float32:
        module.to(dtype=dtype)
    module.requires_grad_(False)
    # decode() does not go through forward: the options (compile above all) go to the decoder network it runs
    timed = module.decoder if profile.arch == "sd15-vae-decoder" else module
    runtime = configure(timed, profile.attention, profile.compile, profile.channels_last)
    gen = torch.Generator("cpu").manual_seed(profile.seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    forward = forward_call(profile, module, config, randn, device)

    def call():
        with attention_context(profile.attention):
            return forward()

    return module, call, device, runtime


def forward_call(profile: LatencyProfile, module, config: dict[str, Any], randn: Callable, device) -> Callable[[], Any]:
    """One denoiser call of ``module`` on fixed inputs of the shapes its pipeline passes at ``profile``'s resolution
    and batch (``randn(*shape)`` makes an input; on the meta device the call checks the shapes without weights)."""
    import torch  # lazy: bench.cli imports this module at startup

    arch = ARCHS[profile.arch]
    side, b = profile.resolution // arch.downsample, profile.batch_size
    class_name = type(module).__name__
    if profile.arch == "sd15-vae-decoder":
        z = randn(b, config["latent_channels"], side, side)
        return lambda: module.decode(z).sample
    if class_name == "UNet2DConditionModel":
        x, context = randn(b, config["in_channels"], side, side), randn(b, arch.text_tokens, config["cross_attention_dim"])
        t = torch.full((b,), 500, device=device)
        extra = {}
        if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text embedding + 6 time ids
            pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
            size = float(profile.resolution)  # original size = target size, crop (0, 0): the pipeline's default
            time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]]).repeat(b, 1).to(device=device)
            extra["added_cond_kwargs"] = {"text_embeds": randn(b, pooled), "time_ids": time_ids}
        return lambda: module(x, t, encoder_hidden_states=context, **extra).sample
    if class_name == "SD3Transformer2DModel":
        x = randn(b, config["in_channels"], side, side)
        context, pooled = randn(b, arch.text_tokens, config["joint_attention_dim"]), randn(b, config["pooled_projection_dim"])
        t = torch.full((b,), 500.0, device=device)  # StableDiffusion3Pipeline passes sigma * 1000
        return lambda: module(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                              timestep=t).sample
    if class_name == "FluxTransformer2DModel":
        h = side // 2  # FluxPipeline packs 2x2 latent patches (16 channels each) into tokens of 64
        x = randn(b, h * h, config["in_channels"])
        context, pooled = randn(b, arch.text_tokens, config["joint_attention_dim"]), randn(b, config["pooled_projection_dim"])
        img_ids = torch.zeros(h, h, 3)
        img_ids[..., 1] += torch.arange(h)[:, None]
        img_ids[..., 2] += torch.arange(h)[None, :]
        img_ids = img_ids.reshape(h * h, 3).to(device=device)
        txt_ids = torch.zeros(arch.text_tokens, 3, device=device)
        t = torch.full((b,), 0.5, device=device)  # FluxPipeline passes sigma (timestep / 1000)
        guidance = torch.full((b,), 3.5, device=device) if config.get("guidance_embeds") else None
        return lambda: module(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                              img_ids=img_ids, txt_ids=txt_ids, guidance=guidance).sample
    x, t = randn(b, config["in_channels"], side, side), torch.full((b,), 500, device=device)
    return lambda: module(x, t).sample


def parameter_count(arch: str) -> int:
    """Parameters of ``arch`` built on the meta device (no memory, no weights)."""
    import diffusers  # lazy: bench.cli imports this module at startup
    import torch

    class_name, config = _config(arch)
    with torch.device("meta"):
        module = getattr(diffusers, class_name).from_config(config)
    return sum(p.numel() for p in module.parameters())


def available_bytes(device) -> int | None:
    """Memory free for new tensors on ``device`` (CPU: MemAvailable of /proc/meminfo; CUDA: free memory), or None
    where it cannot be read."""
    import torch  # lazy: bench.cli imports this module at startup

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_memory(profile: LatencyProfile, device, dtype) -> None:
    """Refuse, before allocating, an architecture whose random weights alone do not fit the device's free memory
    (FLUX.1's 12B-parameter transformer on this project's 24 GB CPU machines); its size comes from the meta device."""
    free = available_bytes(device)
    if free is None:
        return
    need = parameter_count(profile.arch) * dtype.itemsize
    if need > free:
        raise BenchError(f"--arch {profile.arch} needs {need / 2**30:.1f} GiB for its {profile.dtype} weights alone and "
                         f"{device} has {free / 2**30:.1f} GiB free: profile it on a GPU with more memory (--device "
                         f"cuda), or in bfloat16 / float16")


def time_calls(call: Callable[[], Any], device, warmup: int, iters: int) -> tuple[list[float], float]:
    """Seconds of each of ``iters`` timed calls after ``warmup`` untimed ones (CUDA events on a GPU, a synchronised
    perf_counter elsewhere), and the first call's seconds (compilation, allocation)."""
    import torch  # lazy: bench.cli imports this module at startup

    from bench.denoiser import synchronize

    first = 0.0
    with torch.inference_mode():
        for _ in range(warmup):
            synchronize(device)
            t0 = time.perf_counter()
            call()
            synchronize(device)
            first = first or time.perf_counter() - t0
        if device.type == "cuda":
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
            for start, end in events:
                start.record()
                call()
                end.record()
            synchronize(device)
            return [s.elapsed_time(e) / 1000 for s, e in events], first
        seconds = []
        for _ in range(iters):
            synchronize(device)
            t0 = time.perf_counter()
            call()
            synchronize(device)
            seconds.append(time.perf_counter() - t0)
    return seconds, first


def measure_latency(profile: LatencyProfile) -> dict[str, Any]:
    """Per-call and per-image latency of ``profile``: the protocol, the values and the machine."""
    import torch  # lazy: bench.cli imports this module at startup

    from bench.runner import device_name
    from metrics.latency import spread

    module, call, device, runtime = build(profile)
    seconds, first = time_calls(call, device, profile.warmup, profile.iters)
    per_call = [1000 * s for s in seconds]
    values = {**spread(per_call, "latency_per_call_ms"),
              **spread([ms / profile.batch_size for ms in per_call], "latency_per_image_ms"),
              "first_call_s": first, "timed_calls": float(len(seconds)),
              "params": float(sum(p.numel() for p in module.parameters()))}
    if device.type == "cuda":
        values["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    protocol = {**dataclasses.asdict(profile), "device": str(device), "call": ARCHS[profile.arch].call,
                "runtime": runtime, "timing": "CUDA events" if device.type == "cuda" else "synchronised perf_counter",
                "grad_mode": "inference_mode", "weights": "random (latency does not depend on them)"}
    environment = {"device_name": device_name(str(device)), "torch_version": torch.__version__,
                   "torch_threads": torch.get_num_threads()}
    return {"protocol": protocol, "values": values, "environment": environment}


# -- the harness's own cost ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HarnessBenchmark:
    """Sizes of the harness benchmarks (embedded pixel DDPM, DDIM, shapes16)."""

    num_samples: int = 500
    steps: int = 20
    batch_size: int = 250
    repeats: int = 5
    seed: int = 0


BOUNDS = {  # name: (bound, "max" or "min"): issue 6's
    "harness_overhead": (0.03, "max"),
    "throughput_ratio": (1.0, "min"),
    "metric_phase_ratio": (1.0, "max"),
    "cached_metric_speedup": (10.0, "min"),
    "streamed_metric_ratio": (0.2, "max"),  # issue 20's
}


def check_bounds(values: dict[str, float], bounds: dict[str, tuple[float, str]]) -> dict[str, dict[str, Any]]:
    """Each bounded value that was measured: value, bound, kind ("max" or "min") and whether it holds."""
    return {k: {"value": values[k], "bound": b, "kind": kind, "holds": values[k] <= b if kind == "max" else values[k] >= b}
            for k, (b, kind) in bounds.items() if k in values}


def _plan(bench: HarnessBenchmark, output: Path, metrics: tuple[str, ...]):
    from bench.runner import plan_run  # lazy: bench.cli imports this module at startup

    spec = RunSpec(method="ddim", model="embedded-ddpm", dataset="shapes16", steps=bench.steps,
                   num_samples=bench.num_samples, batch_size=bench.batch_size, seed=bench.seed, metrics=metrics,
                   device="cpu", warmup_batches=0, output=str(output))
    return plan_run(spec)


def _plain_ddim(plan) -> Callable[[], Any]:
    """diffusers' DDIMPipeline with the run's scheduler config, steps, batch size and per-sample seeds."""
    import numpy as np  # lazy: bench.cli imports this module at startup
    import torch
    from diffusers import DDIMPipeline

    from bench.denoiser import sample_seed
    from bench.runner import batch_range, num_batches

    spec = plan.spec
    pipe = DDIMPipeline(unet=plan.model.unet, scheduler=plan.method.make_scheduler(plan.model))
    pipe.set_progress_bar_config(disable=True)

    def run() -> np.ndarray:
        out = []
        for k in range(num_batches(spec)):
            indices = range(*batch_range(spec, k))
            generators = [torch.Generator("cpu").manual_seed(sample_seed(spec.seed, i)) for i in indices]
            images = pipe(batch_size=len(indices), generator=generators, eta=0.0, num_inference_steps=spec.steps,
                          output_type="np").images
            out.append((images * 255).round().astype(np.uint8))  # as diffusers' numpy_to_pil
        return np.concatenate(out)

    return run


def sampling_benchmarks(bench: HarnessBenchmark, workdir: Path, raw: dict[str, list[float]]) -> tuple[dict[str, float], Any]:
    """Harness overhead and throughput against DDIMPipeline, interleaved ``repeats`` times; also the samples.
    ``raw`` receives every repeat's seconds."""
    import numpy as np  # lazy: bench.cli imports this module at startup

    from bench.runner import sample

    plan = _plan(bench, workdir / "run", ("latency",))
    plain = _plain_ddim(plan)
    warm = dataclasses.replace(plan, spec=plan.spec.replace(num_samples=min(8, bench.num_samples)))
    sample(warm, progress=False)  # first calls allocate; left out of both
    _plain_ddim(warm)()
    wall: dict[str, list[float]] = {"harness": [], "plain": []}
    cpu: dict[str, list[float]] = {"harness": [], "plain": []}  # this process's CPU time: what a shared machine's
    # other jobs do not change (sampling is single-process; with OMP_NUM_THREADS=1, single-threaded)
    overhead = []
    samples = reference = None
    for r in range(bench.repeats):
        for which in (("harness", "plain") if r % 2 == 0 else ("plain", "harness")):
            t0, c0 = time.perf_counter(), time.process_time()
            if which == "harness":
                samples, timings = sample(plan, progress=False)
                overhead.append((time.perf_counter() - t0) / sum(sum(c) for c in timings.call_seconds) - 1)
            else:
                reference = plain()
            wall[which].append(time.perf_counter() - t0)
            cpu[which].append(time.process_time() - c0)
    if not np.array_equal(samples, reference):
        raise BenchError("the harness and DDIMPipeline made different images; the throughput comparison is void")
    raw.update(harness_seconds=wall["harness"], plain_pipeline_seconds=wall["plain"], harness_overhead=overhead,
               harness_cpu_seconds=cpu["harness"], plain_pipeline_cpu_seconds=cpu["plain"])

    def ratio(times: dict[str, list[float]]) -> float:  # the median over pairs made back to back
        return statistics.median(p / h for h, p in zip(times["harness"], times["plain"]))

    values = {
        "harness_overhead": statistics.median(overhead),
        "throughput_ratio": ratio(wall),
        "throughput_ratio_cpu_time": ratio(cpu),
        "harness_seconds": statistics.median(wall["harness"]),
        "plain_pipeline_seconds": statistics.median(wall["plain"]),
        "same_images": 1.0,
    }
    return values, samples


def metric_benchmarks(bench: HarnessBenchmark, samples, workdir: Path, raw: dict[str, list[float]]) -> dict[str, float]:
    """The metric phase (fid, kid) cold and with cached reference features, against calculate_metrics.

    torch-fidelity runs three ways on the same images and extractor: with its defaults (what calling it directly
    gives: batch 64, DataLoader workers), with the harness's feature settings (batch 200, no workers), and with its
    own cache of the reference features (the second of two calls). Its FID accumulates statistics in float32 where
    the harness uses float64, so the values agree to about 1e-6 relative.
    """
    import numpy as np  # lazy: bench.cli imports this module at startup
    import torch
    import torch_fidelity

    from bench.datasets import Shapes16
    from bench.evaluation import FEATURE_BATCH_SIZE, SamplingTimings, UInt8Images
    from bench.runner import evaluate
    from bench.extractors import ensure_registered
    from metrics.fidelity import kid_subset_size

    plan = _plan(bench, workdir / "metrics", ("fid", "kid"))
    timings = SamplingTimings(batch_calls=[bench.steps])
    images = torch.from_numpy(samples).permute(0, 3, 1, 2).contiguous()
    ensure_registered()
    common = dict(fid=True, kid=True, feature_extractor="shapes-cnn16", feature_layer_fid="embedding",
                  feature_layer_kid="embedding", kid_subsets=100, kid_subset_size=kid_subset_size(len(samples)),
                  rng_seed=2020, cuda=False, verbose=False)
    matched = dict(batch_size=FEATURE_BATCH_SIZE, save_cpu_ram=True)

    def torch_fidelity_seconds(**options) -> tuple[float, dict]:
        t0 = time.perf_counter()
        out = torch_fidelity.calculate_metrics(**{"input1": UInt8Images(images), "input2": Shapes16().dataset(),
                                                  **common, **options})
        return time.perf_counter() - t0, out

    times: dict[str, list[float]] = {k: [] for k in ("cold", "cached", "tf", "tf_matched", "tf_cached")}
    old_cache = os.environ.get("DIFFBENCH_CACHE")
    try:
        for r in range(bench.repeats):
            os.environ["DIFFBENCH_CACHE"] = str(workdir / f"cache-{r}")  # empty: the first run renders and embeds
            t0 = time.perf_counter()
            cold = evaluate(plan, samples, timings)
            times["cold"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            cached = evaluate(plan, samples, timings)
            times["cached"].append(time.perf_counter() - t0)
            if cold != cached:
                raise BenchError(f"cached reference features changed the metric values: {cold} against {cached}")
            seconds, tf = torch_fidelity_seconds(cache=False)
            times["tf"].append(seconds)
            times["tf_matched"].append(torch_fidelity_seconds(cache=False, **matched)[0])
            tf_cache = dict(cache=True, cache_root=str(workdir / f"tf-cache-{r}"), input2_cache_name="shapes16", **matched)
            torch_fidelity_seconds(**tf_cache)  # fills its cache
            times["tf_cached"].append(torch_fidelity_seconds(**tf_cache)[0])
        # a whole run (bench.runner.execute): features streamed as each batch is made, so after the last batch only
        # the statistics remain; its metric_seconds against calculate_metrics on its images (reference cache warm)
        from bench.runner import execute
        from bench.shards import ShardStore
        from bench.tracking import Tracker

        tracker = Tracker(f"sqlite:///{workdir / 'mlflow.db'}", "diffbench-profile")
        tracker.check()
        times["streamed"], times["tf_streamed"] = [], []
        for r in range(bench.repeats):
            run = execute(_plan(bench, workdir / f"streamed-{r}", ("fid", "kid")), tracker, progress=False)
            store = ShardStore(run.output, run.plan.protocol_hash)
            made = torch.from_numpy(np.concatenate([np.load(p) for p in sorted(store.dir.glob("shard-*.npy"))]))
            times["streamed"].append(run.values["metric_seconds"])
            times["tf_streamed"].append(torch_fidelity_seconds(cache=False, input1=UInt8Images(
                made.permute(0, 3, 1, 2).contiguous()))[0])
    finally:
        if old_cache is None:
            os.environ.pop("DIFFBENCH_CACHE", None)
        else:
            os.environ["DIFFBENCH_CACHE"] = old_cache
    raw.update({f"metric_{k}_seconds": v for k, v in times.items()})
    m = {k: statistics.median(v) for k, v in times.items()}

    def ratio(a: str, b: str) -> float:  # the median over repeats of a ratio measured within one repeat
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    return {
        "metric_phase_ratio": ratio("cold", "tf"),
        "metric_phase_ratio_matched_settings": ratio("cold", "tf_matched"),
        "cached_metric_ratio": ratio("cached", "tf_cached"),
        "cached_metric_speedup": ratio("cold", "cached"),
        "streamed_metric_ratio": ratio("streamed", "tf_streamed"),
        "streamed_metric_seconds": m["streamed"],
        "metric_phase_seconds": m["cold"],
        "metric_phase_cached_seconds": m["cached"],
        "torch_fidelity_seconds": m["tf"],
        "torch_fidelity_matched_seconds": m["tf_matched"],
        "torch_fidelity_cached_seconds": m["tf_cached"],
        "fid_rel_difference": abs(cold["fid"] - tf["frechet_inception_distance"]) / abs(tf["frechet_inception_distance"]),
        "kid_abs_difference": abs(cold["kid_mean"] - tf["kernel_inception_distance_mean"]),
    }


def run_harness_benchmarks(bench: HarnessBenchmark, only: tuple[str, ...] = ("sampling", "metrics")) -> dict[str, Any]:
    """All harness benchmarks in this process; returns the values, their bounds and the machine's state."""
    import torch  # lazy: bench.cli imports this module at startup

    from bench.runner import sample

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="diffbench-profile-") as tmp:
        workdir = Path(tmp)
        raw: dict[str, list[float]] = {}
        if "sampling" in only:
            values, samples = sampling_benchmarks(bench, workdir, raw)
        else:
            values, samples = {}, sample(_plan(bench, workdir / "run", ("latency",)), progress=False)[0]
        if "metrics" in only:
            values.update(metric_benchmarks(bench, samples, workdir, raw))
    checks = check_bounds(values, BOUNDS)
    return {"benchmark": dataclasses.asdict(bench), "values": values, "checks": checks, "repeats": raw,
            "environment": {"load_average_before": load_before, "load_average": os.getloadavg(),
                            "torch_threads": torch.get_num_threads(),
                            "cpu_count": os.cpu_count()}}


# -- sweeps: the cost of many cells, and scaling out ----------------------------------------------------------------


@dataclass(frozen=True)
class SweepBenchmark:
    """A sweep of small cells on the embedded pixel DDPM (shapes16): methods x steps x seeds."""

    methods: tuple[str, ...] = ("ddim", "dpmsolver++")
    steps: tuple[int, ...] = (5, 10, 20)
    seeds: int = 4
    num_samples: int = 256
    batch_size: int = 128
    metrics: tuple[str, ...] = ("fid", "kid", "latency")
    ray_workers: int = 2  # Ray workers of one CPU (one thread) each; 0 leaves the Ray comparison out

    @property
    def cells(self) -> int:
        return len(self.methods) * len(self.steps) * self.seeds


SWEEP_BOUNDS = {  # issue 20's
    "sweep_overhead_ratio": (1.15, "max"),
    "ray_throughput_ratio": (1.6, "min"),
}
SWEEP_SAME_COLUMNS = ("fid", "kid_mean", "nfe")  # what must not depend on the executor (latency does)


def _bench_command(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "bench", *args]


def _timed(cmd: list[str], env: dict[str, str], log: Path) -> float:
    """Wall seconds of a command (its output to ``log``); BenchError with the log's tail if it fails."""
    import subprocess

    t0 = time.perf_counter()
    with open(log, "w") as fh:
        code = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    seconds = time.perf_counter() - t0
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-5:])
        raise BenchError(f"`{' '.join(cmd[2:])}` exited {code}:\n{tail}")
    return seconds


def run_sweep_benchmarks(bench: SweepBenchmark) -> dict[str, Any]:
    """Wall time of `bench sweep` (a new process, as a user starts it, all cores) against the sum of its cells'
    sampling, streamed-feature and metric seconds; then the same sweep on a running local Ray cluster of
    ``ray_workers`` one-CPU workers against the local executor with one thread (throughput: cells per second of
    wall time; the same CPUs per cell, so the ratio is the scale-out), and against the all-cores local run. The
    MLflow store and the reference-feature cache exist before the timed commands (a warm-up run makes them: a user's second sweep); the Ray cluster is
    started before its sweep is timed, and its start time is reported apart."""
    with tempfile.TemporaryDirectory(prefix="diffbench-sweep-") as tmp:
        values = _sweep_benchmarks(bench, Path(tmp))
    return {"benchmark": dataclasses.asdict(bench), "values": values, "checks": check_bounds(values, SWEEP_BOUNDS),
            "environment": {"load_average_before": values.pop("load_average_before"),
                            "load_average": os.getloadavg(), "cpu_count": os.cpu_count()}}


def _sweep_benchmarks(bench: SweepBenchmark, root: Path) -> dict[str, Any]:
    import csv
    import shutil
    import subprocess
    import sys

    import yaml

    # the local executor with its default threads (all cores): the thread limits of this process are not passed on
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(DIFFBENCH_CACHE=str(root / "cache"), PYTHONUNBUFFERED="1")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    suite = {"name": "sweep-benchmark", "seeds": bench.seeds,
             "defaults": {"num_samples": bench.num_samples, "batch_size": bench.batch_size,
                          "metrics": list(bench.metrics), "model": "embedded-ddpm", "dataset": "shapes16"},
             "grid": [{"method": list(bench.methods), "steps": list(bench.steps)}]}
    (root / "suite.yaml").write_text(yaml.safe_dump(suite, sort_keys=False))
    load_before = os.getloadavg()
    _timed(_bench_command("run", "--method", "ddim", "--steps", "1", "--num-samples", "128", "--metrics", "fid,kid",
                          "--tracking-uri", uri, "--output", str(root / "warm-up"), "--no-progress"), env,
           root / "warm-up.log")

    def sweep(name: str, *extra: str, threads: int | None = None) -> tuple[float, list[dict[str, str]]]:
        out = root / name
        run_env = env if threads is None else {**env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        seconds = _timed(_bench_command("sweep", "--suite", str(root / "suite.yaml"), "--tracking-uri", uri,
                                        "--out", str(out), "--no-progress", *extra), run_env, root / f"{name}.log")
        with open(out / "runs.csv", newline="") as fh:
            return seconds, list(csv.DictReader(fh))

    values: dict[str, Any] = {"load_average_before": load_before}
    wall, rows = sweep("local")
    cell_seconds = sum(float(r["sampling_seconds"]) + float(r["streamed_feature_seconds"]) + float(r["metric_seconds"])
                       for r in rows)  # a cell's work: its batches, its features (extracted as they are made), metrics
    values.update(sweep_seconds=wall, cells=float(len(rows)), cells_sampling_and_metric_seconds=cell_seconds,
                  sweep_overhead_ratio=wall / cell_seconds)
    if bench.ray_workers:
        # the scale-out comparison gives every cell the same CPUs: one thread in the local executor and in each
        # Ray worker (Ray sets a one-CPU task's OMP_NUM_THREADS to 1); against all-cores local, for the record
        one_wall, one_rows = sweep("local-1-thread", threads=1)
        values["sweep_one_thread_seconds"] = one_wall
        ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
        if ray is None:
            raise BenchError("the Ray comparison needs Ray: pip install 'diffbench[scale]' (or pass --ray-workers 0)")
        ray_env = {**env, "RAY_USAGE_STATS_ENABLED": "0"}
        t0 = time.perf_counter()
        subprocess.run([ray, "start", "--head", f"--num-cpus={bench.ray_workers}", "--include-dashboard=false",
                        f"--temp-dir={root / 'ray'}"], env=ray_env, check=True, capture_output=True)
        values["ray_start_seconds"] = time.perf_counter() - t0
        try:
            ray_wall, ray_rows = sweep("ray", "--executor", "ray", "--ray-address", "auto", "--cpus-per-cell", "1")
        finally:
            subprocess.run([ray, "stop", "--force"], env=ray_env, capture_output=True)
        def same(runs: list[dict[str, str]]) -> list[list[str]]:
            return [[r[c] for c in SWEEP_SAME_COLUMNS] for r in runs]

        if not same(ray_rows) == same(rows) == same(one_rows):
            raise BenchError("the Ray executor's cells have other values than the local executor's; the comparison "
                             "is void")
        values.update(ray_sweep_seconds=ray_wall, ray_throughput_ratio=one_wall / ray_wall,
                      ray_throughput_ratio_against_all_threads=wall / ray_wall)
    return values
