"""The claims engine: plan the runs that the declared claims need, reuse or make them, and decide each claim.

A method declares its claims (``Method.claims``, bench/claim.py). ``bench claims`` (bench/cli/claims.py):

1. **plan**: every arm of every selected claim becomes one run spec per seed (``--quick``: the arm's quick sample
   count and seeds). Identical specs, within a claim or across claims, are one run.
2. **reuse**: a run whose protocol hash (bench/runner.plan_run) matches a FINISHED MLflow run of the experiment
   is not made again; its metrics are read back.
3. **run**: the missing runs go through an executor (bench/executors.py: in this process, on Ray or as Slurm
   jobs) and the normal runner (``plan_run`` + ``execute``), each one an MLflow run tagged ``diffbench_claims``; a
   run that fails (after its retries) is reported, and the claims that needed it are "not measured".
4. **decide**: each claim by its relation and tolerance rule over the seeds (``decide``), one verdict: holds,
   does not hold, not measured (with the reason).
5. **record**: one MLflow run named ``claims`` per invocation with a tag per claim (``claim.<method>.<id>``) and
   the table as ``claims.json`` and ``claims.csv`` artifacts. ``bench report`` reads the newest one back
   (``latest_verdicts``).

The planner and the verdict rules need no model and no run: tests/test_claims.py feeds them values.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

from bench.claim import Arm, Claim
from bench.errors import BenchError
from bench.spec import RunSpec, stable_hash

HOLDS, FAILS, UNMEASURED = "holds", "does not hold", "not measured"
CLAIMS_RUN_TAG = "diffbench_claims"  # on the claims run itself ("verdicts") and on every run it made ("run")

# The plan's cost model (seconds), stated so that `bench claims --plan` can say how it estimates: the milliseconds
# one sample spends per denoiser call on a 2-core CPU, per model, and a fixed cost per run (model load, metrics).
MS_PER_SAMPLE_CALL = {"embedded-ddpm": 1.0, "embedded-ddpm-zsnr": 1.0}
MS_PER_SAMPLE_CALL_DEFAULT = 6.0  # the embedded text-to-image model (latents, text encoder, decoder)
SECONDS_PER_RUN = 4.0
SECONDS_PER_TRAIN_STEP = 0.15  # methods that train in prepare (personalization, alignment): per optimizer step
# denoiser calls per step and sample beyond one (second-order steps; a classifier's gradient counted as two calls)
CALLS_PER_STEP = {"heun": 2.0, "kdpm2": 2.0, "classifier-guidance": 3.0, "null-text-inversion": 4.0}


# -- planning -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedRun:
    """One run the claims need: a RunSpec (fixed seed) and who needs it."""

    key: str  # stable hash of the spec's hashed fields: identical specs are one run
    spec: RunSpec
    calls_per_step: float = 1.0  # denoiser calls per step and sample (2 with guidance, Heun...)
    train_steps: int = 0  # optimizer steps in prepare, from the method's options (0: nothing trained)
    num_samples: int = 0  # the resolved sample count (the spec keeps None for the data set's default)
    train_key: str | None = None  # runs with the same key share one training (a method whose Args has training())

    def sample_calls(self) -> int:
        n = self.spec.num_samples or self.num_samples
        return int(round(n * self.spec.steps * self.calls_per_step))

    def estimate_seconds(self) -> float:
        ms = MS_PER_SAMPLE_CALL.get(self.spec.model or "", MS_PER_SAMPLE_CALL_DEFAULT)
        return SECONDS_PER_RUN + self.sample_calls() * ms / 1000 + self.train_steps * SECONDS_PER_TRAIN_STEP


@dataclass(frozen=True)
class ClaimRef:
    method: str
    claim: Claim

    @property
    def qualified(self) -> str:
        return f"{self.method}/{self.claim.id}"


@dataclass
class ClaimPlan:
    """The claims selected, and for each of them the run keys of each arm in seed order."""

    claims: list[ClaimRef]
    runs: dict[str, PlannedRun]  # key -> run, in first-needed order
    arms: dict[str, list[list[tuple[int, str]]]]  # qualified claim -> per arm: [(seed, run key), ...]
    quick: bool

    def sample_calls(self) -> int:
        return sum(r.sample_calls() for r in self.runs.values())

    def estimate_seconds(self) -> float:
        """Every run's estimate; a training that several runs share (asyrp's f_t across strengths) counted once."""
        seen: set[str] = set()
        total = 0.0
        for r in self.runs.values():
            total += r.estimate_seconds()
            if r.train_key is not None:
                if r.train_key in seen:
                    total -= r.train_steps * SECONDS_PER_TRAIN_STEP
                seen.add(r.train_key)
        return total

    def shared(self) -> int:
        """Runs needed by more than one claim."""
        count: dict[str, int] = {}
        for per_arm in self.arms.values():
            for key in {k for arm in per_arm for _, k in arm}:
                count[key] = count.get(key, 0) + 1
        return sum(1 for n in count.values() if n > 1)


def arm_seeds(arm: Arm, quick: bool) -> tuple[int, ...]:
    if quick:
        return tuple(arm.quick_seeds if arm.quick_seeds is not None else arm.seeds[:2])
    return tuple(arm.seeds)


def arm_spec(arm: Arm, seed: int, quick: bool, base: RunSpec | None = None) -> RunSpec:
    """The RunSpec of one arm at one seed (fields the arm leaves None take the runner's defaults)."""
    base = base or RunSpec()
    n = arm.quick_num_samples if quick and arm.quick_num_samples is not None else arm.num_samples
    steps = arm.quick_steps if quick and arm.quick_steps is not None else arm.steps
    changes: dict[str, Any] = {"method": arm.method, "steps": steps, "method_args": arm_options(arm, quick),
                               "model": arm.model, "dataset": arm.dataset, "num_samples": n, "seed": seed,
                               "metrics": tuple(arm.metrics) if arm.metrics else None, "output": None,
                               "run_name": f"claims:{arm.method}-{steps}steps-seed{seed}"}
    if arm.batch_size is not None:
        changes["batch_size"] = arm.batch_size
    elif n is not None:
        changes["batch_size"] = min(base.batch_size, n)
    return base.replace(**changes)


def arm_options(arm: Arm, quick: bool) -> dict[str, Any]:
    return {**arm.options, **(arm.quick_options if quick else {})}


def spec_key(spec: RunSpec) -> str:
    return stable_hash(spec.hashed_fields())


def _train_steps(method_cls: Any, options: Mapping[str, Any]) -> int:
    """Optimizer steps an arm trains in prepare: the ``steps``-like option of the method's Args, if any."""
    import dataclasses

    try:
        fields = {f.name: f for f in dataclasses.fields(method_cls.Args)}
    except TypeError:
        return 0
    planned = getattr(method_cls, "planned_train_steps", None)  # a method whose budget is not one option (asyrp)
    if planned is not None:
        return int(planned(method_cls.Args(**{k: v for k, v in options.items() if k in fields})))
    for name in ("train_steps", "max_train_steps", "num_train_steps"):
        if name in fields:
            value = options.get(name, fields[name].default)
            return int(value) if isinstance(value, (int, float)) else 0
    return 0


def _train_key(method_cls: Any, options: Mapping[str, Any], spec: RunSpec) -> str | None:
    """What identifies the training of a method whose Args say which options define it (``training()``), so that
    runs differing only in inference options share one training in the estimate; None for every other method."""
    import dataclasses

    args_cls = getattr(method_cls, "Args", None)
    if method_cls is None or not hasattr(args_cls, "training"):
        return None
    names = {f.name for f in dataclasses.fields(args_cls)}
    training = args_cls(**{k: v for k, v in options.items() if k in names}).training()
    return stable_hash({"method": spec.method, "model": spec.model, "dataset": spec.dataset, "seed": spec.seed,
                        "training": training})


def _calls_per_step(method_cls: Any, options: Mapping[str, Any]) -> float:
    import dataclasses

    calls = float(getattr(method_cls, "calls_per_step", CALLS_PER_STEP.get(getattr(method_cls, "name", ""), 1.0)))
    try:
        names = {f.name: f for f in dataclasses.fields(method_cls.Args)}
    except TypeError:
        names = {}
    if "guidance" in names:  # classifier-free guidance: two branches (one batched forward)
        scale = options.get("guidance", names["guidance"].default)
        calls *= 2.0 if isinstance(scale, (int, float)) and scale != 1 else 1.0
    return calls


def select_claims(methods: Sequence[str] | None = None, registry: Any = None) -> list[ClaimRef]:
    """The claims of ``methods`` (all registered methods if None), in registry order. Unknown names: UnknownName
    (a BenchError, exit 2) with the closest registered name."""
    if registry is None:
        from bench.catalog import METHODS as registry
    names = list(methods) if methods else registry.names()
    for name in names:
        registry.entry(name)  # raises UnknownName ("did you mean ...")
    refs = []
    for name in names:
        for claim in getattr(registry.get(name), "claims", ()):
            refs.append(ClaimRef(name, claim))
    return refs


def plan_claims(claims: Sequence[ClaimRef], quick: bool = False, base: RunSpec | None = None,
                method_class: Callable[[str], Any] | None = None, num_samples: int | None = None,
                seeds: Sequence[int] | None = None) -> ClaimPlan:
    """Expand each claim's arms into one run per seed; identical specs (across claims too) become one run.

    ``method_class(name)`` gives the method's class for the cost estimate (training steps, calls per step); None
    looks it up in the registry. ``num_samples`` / ``seeds`` override every arm's (the default test suite runs
    the declared claims at a tiny size). Nothing is loaded or run.
    """
    if method_class is None:
        from bench.catalog import METHODS

        method_class = METHODS.get
    runs: dict[str, PlannedRun] = {}
    arms: dict[str, list[list[tuple[int, str]]]] = {}
    for ref in claims:
        per_arm = []
        for _, arm in ref.claim.arms:
            keyed = []
            if num_samples is not None:
                arm = replace(arm, num_samples=num_samples, quick_num_samples=num_samples, batch_size=None)
            for seed in (tuple(seeds) if seeds is not None else arm_seeds(arm, quick)):
                spec = arm_spec(arm, seed, quick, base)
                key = spec_key(spec)
                if key not in runs:
                    try:
                        cls = method_class(arm.method)
                    except Exception:
                        cls = None
                    opts = arm_options(arm, quick)
                    runs[key] = PlannedRun(key, spec, _calls_per_step(cls, opts) if cls else 1.0,
                                           _train_steps(cls, opts) if cls else 0,
                                           _resolve_num_samples(spec, cls), _train_key(cls, opts, spec))
                keyed.append((seed, key))
            per_arm.append(keyed)
        if ref.qualified in arms:
            raise BenchError(f"claim {ref.qualified} is declared twice")
        arms[ref.qualified] = per_arm
    return ClaimPlan(list(claims), runs, arms, quick)


def _resolve_num_samples(spec: RunSpec, method_cls: Any) -> int:
    """The sample count the runner will use (for the estimate only; the spec itself keeps None)."""
    if spec.num_samples is not None:
        return spec.num_samples
    from bench.spec import DEFAULT_DATASET, DEFAULT_NUM_SAMPLES

    n = DEFAULT_NUM_SAMPLES
    try:
        from bench.catalog import DATASETS

        name = spec.dataset or getattr(method_cls, "default_dataset", None) or DEFAULT_DATASET
        n = getattr(DATASETS.get(name), "default_num_samples", None) or DEFAULT_NUM_SAMPLES
    except Exception:
        pass
    return n


def format_plan(plan: ClaimPlan) -> str:
    lines = [f"{len(plan.claims)} claim{'s' * (len(plan.claims) != 1)} of "
             f"{len({c.method for c in plan.claims})} methods need {len(plan.runs)} runs "
             f"({plan.shared()} shared between claims; {'--quick' if plan.quick else 'full'} size)"]
    for ref in plan.claims:
        per_arm = plan.arms[ref.qualified]
        arms = "; ".join(f"{label}: {_arm_text(arm, plan.quick)}" for (label, arm), _ in zip(ref.claim.arms, per_arm))
        lines.append(f"  {ref.qualified:<44} {ref.claim.metric} {ref.claim.relation}  [{arms}]")
    total = plan.estimate_seconds()
    lines.append(f"sample-calls (samples x steps x denoiser calls per step): {plan.sample_calls():,}")
    lines.append(f"estimated time if nothing is reused: {total / 60:.1f} min on a 2-core CPU "
                 f"({SECONDS_PER_RUN:g} s per run, {MS_PER_SAMPLE_CALL['embedded-ddpm']:g} ms per sample-call on "
                 f"embedded-ddpm, {MS_PER_SAMPLE_CALL_DEFAULT:g} ms on the text-to-image model, "
                 f"{SECONDS_PER_TRAIN_STEP:g} s per training step); FINISHED MLflow runs of the same protocol are "
                 f"reused when it runs")
    return "\n".join(lines)


def _arm_text(arm: Arm, quick: bool) -> str:
    opts = ",".join(f"{k}={v}" for k, v in sorted(arm_options(arm, quick).items()))
    n = arm.quick_num_samples if quick and arm.quick_num_samples is not None else arm.num_samples
    steps = arm.quick_steps if quick and arm.quick_steps is not None else arm.steps
    seeds = arm_seeds(arm, quick)
    return (f"{arm.method}{'(' + opts + ')' if opts else ''} {steps} steps"
            f"{' on ' + arm.model if arm.model else ''}, n={n or 'default'}, "
            f"{len(seeds)} seed{'s' * (len(seeds) != 1)}")


# -- verdicts -------------------------------------------------------------------------------------------------


@dataclass
class Verdict:
    method: str
    claim: Claim
    verdict: str  # holds | does not hold | not measured
    values: list[tuple[float, float, int]] = field(default_factory=list)  # per arm: mean, 95% half-width, seeds
    detail: str = ""  # the decisive numbers (differences and their intervals), or why it was not measured
    runs: list[str] = field(default_factory=list)  # MLflow run ids used

    @property
    def qualified(self) -> str:
        return f"{self.method}/{self.claim.id}"

    def measured(self) -> str:
        parts = []
        for (label, _), (mean, half, n) in zip(self.claim.arms, self.values):
            ci = "" if math.isnan(half) else f" ± {half:.3g}"
            parts.append(f"{label} {mean:.4g}{ci} (n={n})")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "claim": self.claim.id, "statement": self.claim.statement,
                "reference": self.claim.reference, "metric": self.claim.metric, "relation": self.claim.relation,
                "tolerance": self.claim.tolerance, "margin": self.claim.margin, "verdict": self.verdict,
                "measured": self.measured(), "detail": self.detail, "note": self.claim.note,
                "arms": [{"label": label, "mean": m, "ci95": h, "seeds": n}
                         for (label, _), (m, h, n) in zip(self.claim.arms, self.values)],
                "runs": self.runs}


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    from bench.sweep import t_interval as t

    return t(list(values))


def _margin(claim: Claim, reference: float) -> float:
    return claim.margin * abs(reference) if getattr(claim, "relative", False) else claim.margin


def _compare(claim: Claim, a: Mapping[int, float], b: Mapping[int, float], direction: str) -> tuple[bool, str]:
    """a < b (direction "less") or a > b ("greater") by the claim's tolerance rule, paired by seed."""
    seeds = sorted(set(a) & set(b))
    ma, mb = t_interval([a[s] for s in a])[0], t_interval([b[s] for s in b])[0]
    m = _margin(claim, mb)
    sign = -1.0 if direction == "less" else 1.0
    if claim.tolerance == "ci" and len(seeds) >= 2:
        d, h = t_interval([a[s] - b[s] for s in seeds])
        ok = (d + h < -m) if direction == "less" else (d - h > m)
        return ok, f"difference {d:+.4g} ± {h:.3g} (paired over {len(seeds)} seeds)"
    d = ma - mb
    ok = sign * d > m
    why = "" if claim.tolerance == "margin" else f"; {len(seeds)} paired seed: no interval, means compared"
    return ok, f"difference {d:+.4g} (margin {m:.3g}{why})"


def _within(claim: Claim, a: Mapping[int, float], b: Mapping[int, float]) -> tuple[bool, str]:
    seeds = sorted(set(a) & set(b))
    mb = t_interval([b[s] for s in b])[0]
    m = _margin(claim, mb)
    if claim.tolerance == "ci" and len(seeds) >= 2:
        d, h = t_interval([a[s] - b[s] for s in seeds])
        return abs(d) <= max(m, h), f"difference {d:+.4g} ± {h:.3g} (paired over {len(seeds)} seeds), margin {m:.3g}"
    d = t_interval([a[s] for s in a])[0] - mb
    return abs(d) <= m, f"difference {d:+.4g}, margin {m:.3g}"


def _no_worse(claim: Claim, a: Mapping[int, float], b: Mapping[int, float], direction: str) -> tuple[bool, str]:
    """at-most (a <= b + m) / at-least (a >= b - m) with two arms: the interval's far end within the margin."""
    seeds = sorted(set(a) & set(b))
    mb = t_interval([b[s] for s in b])[0]
    m = _margin(claim, mb)
    if claim.tolerance == "ci" and len(seeds) >= 2:
        d, h = t_interval([a[s] - b[s] for s in seeds])
        ok = (d + h <= m) if direction == "at-most" else (d - h >= -m)
        return ok, f"difference {d:+.4g} ± {h:.3g} (paired over {len(seeds)} seeds), margin {m:.3g}"
    d = t_interval([a[s] for s in a])[0] - mb
    ok = d <= m if direction == "at-most" else d >= -m
    why = "" if claim.tolerance == "margin" else f"; {len(seeds)} paired seed: no interval, means compared"
    return ok, f"difference {d:+.4g}, margin {m:.3g}{why}"


def _bound(claim: Claim, a: Mapping[int, float]) -> tuple[bool, str]:
    mean, half = t_interval(list(a.values()))
    half = 0.0 if math.isnan(half) or claim.tolerance == "margin" else half
    assert claim.bound is not None
    if claim.relation == "at-most":
        return mean + half <= claim.bound, f"{mean:.4g} + {half:.3g} <= {claim.bound:g}?"
    return mean - half >= claim.bound, f"{mean:.4g} - {half:.3g} >= {claim.bound:g}?"


def decide(claim: Claim, values: Sequence[Mapping[int, float]]) -> tuple[str, str]:
    """The verdict of ``claim`` from each arm's metric value by seed (``values[i][seed]``), and the reason.

    NaN values are left out; an arm with no value left makes the claim "not measured".
    """
    clean = [{s: float(v) for s, v in arm.items() if v is not None and not math.isnan(float(v))} for arm in values]
    for (label, _), arm in zip(claim.arms, clean):
        if not arm:
            return UNMEASURED, f"no value of {claim.metric} for arm {label!r}"
    if len(clean) != len(claim.arms):
        return UNMEASURED, f"{len(clean)} arms measured, {len(claim.arms)} declared"
    r = claim.relation
    if r in ("less", "greater"):
        if len(clean) != 2:
            return UNMEASURED, f"relation {r} needs two arms"
        ok, why = _compare(claim, clean[0], clean[1], r)
    elif r == "within":
        if len(clean) != 2:
            return UNMEASURED, "relation within needs two arms"
        ok, why = _within(claim, clean[0], clean[1])
    elif r in ("at-most", "at-least"):
        ok, why = _bound(claim, clean[0]) if claim.bound is not None else _no_worse(claim, clean[0], clean[1], r)
    elif r == "minimum-inside":
        if len(clean) < 3:
            return UNMEASURED, "relation minimum-inside needs three or more arms"
        means = [t_interval(list(a.values()))[0] for a in clean]
        inner = min(range(1, len(clean) - 1), key=lambda i: means[i])
        ok_l, why_l = _compare(claim, clean[inner], clean[0], "less")
        ok_r, why_r = _compare(claim, clean[inner], clean[-1], "less")
        ok = ok_l and ok_r
        why = (f"lowest inner arm {claim.arms[inner][0]!r}: against {claim.arms[0][0]!r} {why_l}; "
               f"against {claim.arms[-1][0]!r} {why_r}")
    else:  # decreasing / increasing: every neighbouring pair
        direction = "less" if r == "decreasing" else "greater"
        results = [_compare(claim, clean[i + 1], clean[i], direction) for i in range(len(clean) - 1)]
        ok = all(x for x, _ in results)
        why = "; ".join(f"{claim.arms[i + 1][0]} vs {claim.arms[i][0]}: {w}" for i, (_, w) in enumerate(results))
    return (HOLDS if ok else FAILS), why


def judge(plan: ClaimPlan, results: Mapping[str, Mapping[str, float]], errors: Mapping[str, str] | None = None,
          run_ids: Mapping[str, str] | None = None) -> list[Verdict]:
    """One verdict per claim of ``plan`` from each run's metrics (``results[run key]``); ``errors[run key]`` says
    why a run has no results."""
    errors, run_ids = errors or {}, run_ids or {}
    verdicts = []
    for ref in plan.claims:
        claim, per_arm = ref.claim, plan.arms[ref.qualified]
        ids = sorted({run_ids[k] for arm in per_arm for _, k in arm if k in run_ids})
        failed = [(k, errors[k]) for arm in per_arm for _, k in arm if k in errors]
        values = [{seed: results.get(k, {}).get(claim.metric, math.nan) for seed, k in arm} for arm in per_arm]
        summary = [_summary(v) for v in values]
        if failed:
            k, why = failed[0]
            spec = plan.runs[k].spec
            verdicts.append(Verdict(ref.method, claim, UNMEASURED, summary,
                                    f"run {spec.method} {spec.steps} steps seed {spec.seed} failed: {why}", ids))
            continue
        verdict, why = decide(claim, values)
        verdicts.append(Verdict(ref.method, claim, verdict, summary, why, ids))
    return verdicts


def _summary(values: Mapping[int, float]) -> tuple[float, float, int]:
    kept = [v for v in values.values() if not math.isnan(v)]
    if not kept:
        return math.nan, math.nan, 0
    mean, half = t_interval(kept)
    return mean, half, len(kept)


# -- execution ------------------------------------------------------------------------------------------------


def finished_run(tracker, protocol_hash: str):
    """The newest FINISHED MLflow run of the experiment with this protocol hash, or None."""
    if tracker._experiment_id is None:
        tracker.check()
    runs = tracker.client.search_runs(
        [tracker._experiment_id],
        filter_string=f"tags.protocol_hash = '{protocol_hash}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


@dataclass
class Execution:
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    run_ids: dict[str, str] = field(default_factory=dict)
    reused: int = 0
    made: int = 0
    seconds: float = 0.0


def execute_plan(plan: ClaimPlan, tracker, progress: bool = True, log: Callable[[str], None] | None = None,
                 reuse: bool = True, executor=None) -> Execution:
    """Reuse or make every run of ``plan``; failures are recorded, not raised, so the other claims are still decided.

    Every run is planned here and looked up in the store (reuse); the runs to make go through ``executor``
    (bench.executors; None: in this process, one after another).
    """
    from bench.executors import DEFAULT_RETRIES, ExecutorConfig, LocalExecutor, new_token, task_for
    from bench.runner import plan_run

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    executor = executor or LocalExecutor(ExecutorConfig(retries=DEFAULT_RETRIES), log)
    out = Execution()
    t0 = time.perf_counter()
    done_by_hash: dict[str, str] = {}
    same_as: dict[str, str] = {}  # run key -> the key of the run of the same protocol (defaults spelled out)
    tasks, labels = [], {}
    token = new_token()
    total = len(plan.runs)
    for i, (key, run) in enumerate(plan.runs.items(), 1):
        spec = run.spec
        what = f"{spec.method} {json.dumps(dict(spec.method_args), sort_keys=True)} {spec.steps} steps seed {spec.seed}"
        label = labels[key] = f"[{i}/{total}] {what}"
        try:
            p = plan_run(spec)
            if p.protocol_hash in done_by_hash:  # two specs, one protocol
                same_as[key] = done_by_hash[p.protocol_hash]
                continue
            found = finished_run(tracker, p.protocol_hash) if reuse else None
            if found is not None:
                out.results[key] = dict(found.data.metrics)
                out.run_ids[key] = found.info.run_id
                out.reused += 1
                log(f"{label}: reused MLflow run {found.info.run_id[:12]} (protocol {p.protocol_hash[:12]})")
            else:
                log(f"{label}: to make (n={p.spec.num_samples}, est. {run.estimate_seconds():.0f} s)")
                tasks.append(task_for(p, key, what, tracker, token, {CLAIMS_RUN_TAG: "run"}, progress))
            done_by_hash[p.protocol_hash] = key
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # a run that cannot be planned: its claims are "not measured", the others go on
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            out.errors[key] = f"{type(exc).__name__}: {first}" if not isinstance(exc, BenchError) else first
            log(f"{label}: FAILED ({out.errors[key]})")
    for key, outcome in executor.run(tasks).items():
        if outcome.ok:
            out.results[key] = dict(outcome.result["values"])
            if outcome.result["run_id"]:
                out.run_ids[key] = outcome.result["run_id"]
            out.made += 1
        else:
            out.errors[key] = outcome.error
            log(f"{labels[key]}: FAILED after {outcome.attempts} attempt(s) ({outcome.error})")
    for key, other in same_as.items():
        for found in (out.results, out.run_ids, out.errors):
            if other in found:
                found[key] = found[other]
    out.seconds = time.perf_counter() - t0
    return out


def tag_key(method: str, claim_id: str) -> str:
    """``claim.<method>.<id>`` in the characters MLflow allows in a tag key ("dpmsolver++" -> "dpmsolver__")."""
    import re

    return re.sub(r"[^\w\-./ ]", "_", f"claim.{method}.{claim_id}")


def record(verdicts: Sequence[Verdict], tracker, plan: ClaimPlan, execution: Execution, workdir) -> str | None:
    """One MLflow run ``claims``: a tag per claim, counts as metrics, the table as JSON and CSV artifacts."""
    import csv
    from pathlib import Path

    folder = Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [v.to_dict() for v in verdicts]
    (folder / "claims.json").write_text(json.dumps(rows, indent=2, sort_keys=True, default=str) + "\n")
    with open(folder / "claims.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["method", "claim", "metric", "relation", "verdict", "measured", "detail"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tags = {CLAIMS_RUN_TAG: "verdicts", "quick": str(plan.quick).lower()}
    tags.update({tag_key(v.method, v.claim.id): v.verdict for v in verdicts})
    params = {"methods": ",".join(sorted({v.method for v in verdicts})), "quick": plan.quick,
              "claims": len(verdicts), "runs": len(plan.runs)}
    with tracker.run("claims", params, tags) as tracked:
        tracked.log_metrics({"claims_holds": sum(v.verdict == HOLDS for v in verdicts),
                             "claims_fails": sum(v.verdict == FAILS for v in verdicts),
                             "claims_not_measured": sum(v.verdict == UNMEASURED for v in verdicts),
                             "runs_reused": execution.reused, "runs_made": execution.made,
                             "runs_failed": len(execution.errors), "seconds": execution.seconds})
        tracked.log_artifact(folder / "claims.json")
        tracked.log_artifact(folder / "claims.csv")
    return tracked.run_id


def latest_verdicts(tracker, experiment: str | None = "") -> tuple[list[dict[str, Any]], Any] | None:
    """Each claim's newest verdict over the FINISHED claims runs (rows as ``Verdict.to_dict``) and the newest run,
    or None if there is none. ``experiment``: "" the tracker's, None every experiment of the store, else that one."""
    import tempfile

    client = tracker.client
    if experiment is None:
        ids = [e.experiment_id for e in client.search_experiments()]
    elif experiment:
        found = client.get_experiment_by_name(experiment)
        ids = [found.experiment_id] if found else []
    else:
        if tracker._experiment_id is None:
            tracker.check()
        ids = [tracker._experiment_id]
    if not ids:
        return None
    wanted = f"tags.{CLAIMS_RUN_TAG} = 'verdicts' and attributes.status = 'FINISHED'"
    runs = client.search_runs(ids, filter_string=wanted,
                              order_by=["attributes.start_time DESC"], max_results=100)
    if not runs:
        return None
    # a claims run may decide only some methods (--method): each claim's verdict is its newest one
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, run in enumerate(runs):
            path = client.download_artifacts(run.info.run_id, "claims.json", f"{tmp}/{k}")
            with open(path) as fh:
                for row in json.load(fh):
                    rows.setdefault((row.get("method", ""), row.get("id", row.get("claim", ""))), row)
    return list(rows.values()), runs[0]


# -- output ---------------------------------------------------------------------------------------------------

MARKDOWN_BEGIN = "<!-- bench claims --markdown: begin -->"
MARKDOWN_END = "<!-- bench claims --markdown: end -->"


def rows_of(verdicts: Iterable[Verdict | Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [v.to_dict() if isinstance(v, Verdict) else dict(v) for v in verdicts]


def format_table(verdicts: Iterable[Verdict | Mapping[str, Any]]) -> str:
    lines = []
    for r in rows_of(verdicts):
        lines.append(f"{r['verdict'].upper():<14} {r['method']}/{r['claim']}: {r['statement']}")
        if r["measured"]:
            lines.append(f"{'':<14} {r['metric']}: {r['measured']}")
        if r["detail"]:
            lines.append(f"{'':<14} {r['detail']}")
    return "\n".join(lines)


def markdown_table(verdicts: Iterable[Verdict | Mapping[str, Any]]) -> str:
    import pandas as pd

    rows = [{"method": r["method"], "claim": r["statement"], "paper": r["reference"], "metric": r["metric"],
             "measured (mean ± 95% CI, seeds)": r["measured"], "verdict": r["verdict"],
             "why": r["detail"]} for r in rows_of(verdicts)]
    if not rows:
        return "(no claims)"
    return pd.DataFrame(rows).to_markdown(index=False)
