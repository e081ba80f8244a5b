"""Executors of multi-run commands (bench sweep, nightly, claims): where and how each planned run is made.

The command plans every run in its own process (bad input fails before anything runs), turns each plan into a
``Task`` and hands the tasks to an executor:

- ``local``: in this process, one after another (the default);
- ``ray``: each task a Ray task with its CPUs and GPU, on a running cluster (``--ray-address``) or on a local
  instance started for the command;
- ``slurm``: each task a Slurm job of one job array, through submitit (``cluster="local"`` runs the jobs as local
  processes, ``"debug"`` in this process).

Wherever it runs, a task is ``run_task``: the normal ``plan_run`` and ``execute`` of bench/runner.py, into the
task's output folder and MLflow store. A task that raises (or whose worker dies) is run again up to ``retries``
times, and a retry resumes: its complete shards are kept and its MLflow run reopened (one run per task, even
after a SIGKILL). Bad input (BenchError) is deterministic and is reported at once, never retried. Results come
back as they finish; callers order them (a sweep's rows are in cell order whatever the executor).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from bench.errors import BenchError

EXECUTORS = ("local", "ray", "slurm")
SLURM_CLUSTERS = ("slurm", "local", "debug")  # submitit's: a Slurm cluster, local processes, this process
DEFAULT_RETRIES = 2
MARKER = "executor.json"  # in a task's output folder: the invocation that started it and how often it started
POLL_SECONDS = 1.0  # how often the Slurm executor asks submitit about its jobs
LOCAL_JOB_MINUTES = 7 * 24 * 60  # submitit's local jobs are killed after timeout_min (its default: 2 minutes)
INSTALL_HINT = "pip install 'diffbench[scale]'"


# -- options --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExecutorConfig:
    """Where a command's runs are made (``--executor`` and its options; CLI > suite file > these defaults)."""

    name: str = "local"
    retries: int = DEFAULT_RETRIES  # attempts after the first, for a task that raised or whose worker died
    ray_address: str | None = None  # a running Ray cluster; None starts a local instance for the command
    ray_cpus: int | None = None  # CPUs of the local instance (None: os.cpu_count())
    cpus_per_cell: int = 1  # CPUs of each Ray task (its torch threads)
    slurm_cluster: str | None = None  # None: what submitit detects (Slurm where sbatch exists)
    slurm_partition: str | None = None
    slurm_gpus_per_node: int | None = None  # None: 1 for a run on cuda, else 0
    slurm_cpus_per_task: int | None = None
    slurm_time: int | None = None  # minutes
    slurm_array_parallelism: int | None = None  # jobs of the array running at once

    def is_remote_cluster(self) -> bool:
        """Workers on other machines (they cannot share a SQLite file, or a relative path, with this one)."""
        return (self.name == "ray" and self.ray_address is not None) or (
            self.name == "slurm" and self.slurm_cluster not in ("local", "debug"))


# The suite file's ``executor:`` mapping: ``retries`` and one mapping per executor, e.g.
# ``executor: {retries: 3, slurm: {partition: gpu, gpus_per_node: 1, time: 60}}``
SUITE_OPTIONS = {
    "ray": {"address": "ray_address", "cpus": "ray_cpus", "cpus_per_cell": "cpus_per_cell"},
    "slurm": {"cluster": "slurm_cluster", "partition": "slurm_partition", "gpus_per_node": "slurm_gpus_per_node",
              "cpus_per_task": "slurm_cpus_per_task", "time": "slurm_time",
              "array_parallelism": "slurm_array_parallelism"},
}
OPTION_EXECUTOR = {field_: name for name, options in SUITE_OPTIONS.items() for field_ in options.values()}
SUITE_KEY = {"retries": "executor.retries",
             **{field_: f"executor.{name}.{key}" for name, options in SUITE_OPTIONS.items()
                for key, field_ in options.items()}}
POSITIVE = {"ray_cpus", "cpus_per_cell", "slurm_cpus_per_task", "slurm_time", "slurm_array_parallelism"}
NON_NEGATIVE = {"retries", "slurm_gpus_per_node"}
TEXT = {"ray_address", "slurm_partition"}


def cli_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def suite_options(section: Any, where: str) -> dict[str, Any]:
    """The options of a suite's ``executor:`` mapping, by ExecutorConfig field (checked by ``executor_config``)."""
    if not isinstance(section, Mapping):
        raise BenchError(f"{where}: 'executor' must be a mapping, e.g. {{retries: 3, slurm: {{partition: gpu}}}}")
    known = {"retries", *SUITE_OPTIONS}
    unknown = sorted(set(section) - known)
    if unknown:
        raise BenchError(f"{where}: unknown executor keys {unknown}; known: {', '.join(sorted(known))}")
    values: dict[str, Any] = {"retries": section["retries"]} if "retries" in section else {}
    for executor, options in SUITE_OPTIONS.items():
        given = section.get(executor) or {}
        if not isinstance(given, Mapping) or set(given) - set(options):
            raise BenchError(f"{where}: 'executor.{executor}' takes {', '.join(options)}, got {given!r}")
        values.update({options[k]: v for k, v in given.items()})
    return values


def executor_config(cli: Mapping[str, Any], suite: Mapping[str, Any] | None = None,
                    where: str = "suite") -> ExecutorConfig:
    """The executor and its options (CLI > suite file > defaults), checked in full before anything runs.

    ``cli``: the ExecutorConfig fields given on the command line (None: not given); ``suite``: the fields of a
    suite file (``suite_options``). An option of another executor than the one chosen is refused when given on
    the command line (a suite may hold options for several executors).
    """
    name = cli.get("name") or "local"
    if name not in EXECUTORS:
        raise BenchError(f"--executor must be one of {', '.join(EXECUTORS)}, got {name!r}")
    for option, value in cli.items():
        if value is not None and OPTION_EXECUTOR.get(option, name) != name:
            raise BenchError(f"{cli_flag(option)} is an option of --executor {OPTION_EXECUTOR[option]}, "
                             f"not of --executor {name}")
    merged = {**(suite or {}), **{k: v for k, v in cli.items() if v is not None}, "name": name}
    for option, value in merged.items():
        origin = cli_flag(option) if cli.get(option) is not None else f"{where}: {SUITE_KEY.get(option, option)}"
        if option in POSITIVE | NON_NEGATIVE and (
                isinstance(value, bool) or not isinstance(value, int) or value < (1 if option in POSITIVE else 0)):
            kind = "a positive" if option in POSITIVE else "a non-negative"
            raise BenchError(f"{origin} must be {kind} integer, got {value!r}")
        if option in TEXT and not (isinstance(value, str) and value.strip()):
            raise BenchError(f"{origin} must be a non-empty text, got {value!r}")
        if option == "slurm_cluster" and value not in SLURM_CLUSTERS:
            raise BenchError(f"{origin} must be one of {', '.join(SLURM_CLUSTERS)}, got {value!r}")
    config = ExecutorConfig(**{f.name: merged[f.name] for f in fields(ExecutorConfig) if f.name in merged})
    _import(config.name)  # a missing package is bad input now, not after the runs are planned
    if config.name == "ray" and config.ray_address is not None:
        check_ray_address(config.ray_address)
    return config


def check_ray_address(address: str) -> None:
    """A cluster's address must answer a TCP connection: ray.init would wait for minutes on one that does not.
    ``auto`` (the cluster ``ray start`` made on this machine) is left to Ray."""
    import socket
    from urllib.parse import urlparse

    if address == "auto":
        return
    parsed = urlparse(address if "://" in address else f"gcs://{address}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        host = port = None
    if not host or port is None:
        raise BenchError(f"Ray address {address!r} must be auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as exc:
        raise BenchError(f"nothing answers at the Ray address {address} ({exc.strerror or exc}); start the cluster "
                         f"(ray start --head) or leave --ray-address out for a local instance") from None


def _import(name: str):
    """The package of an executor (ray, submitit), imported only when it is chosen."""
    if name == "local":
        return None
    import importlib

    try:
        return importlib.import_module("submitit" if name == "slurm" else name)
    except ImportError:
        raise BenchError(f"--executor {name} needs the package {'submitit' if name == 'slurm' else name}: "
                         f"{INSTALL_HINT}") from None


def warn_if_local_store(config: ExecutorConfig, tracking_uri: str) -> None:
    """One warning line when workers on other machines would write to a file store (SQLite, a folder)."""
    from urllib.parse import urlparse

    if config.is_remote_cluster() and urlparse(tracking_uri).scheme in ("", "file", "sqlite"):
        print(f"bench: warning: --executor {config.name} runs the cells on other machines, and the MLflow store "
              f"{tracking_uri} is a file on this one; give them a tracking server (docs/tracking.md)",
              file=sys.stderr, flush=True)


# -- tasks ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One planned run, as a worker anywhere needs it (picklable: plain values only)."""

    key: str  # unique among the tasks of one invocation
    label: str  # for the log lines
    spec: dict[str, Any]  # the run's resolved RunSpec (RunSpec.to_dict), its output folder absolute
    protocol_hash: str  # the driver's: a worker that computes another one has other code or weights
    tracking_uri: str  # absolute: the same store from every worker's working directory
    experiment: str  # the command's MLflow experiment
    token: str  # the invocation's: a task finding it in its output folder is a retry, and resumes
    tags: dict[str, str] = field(default_factory=dict)  # extra MLflow tags (sweep, sweep_cell, ...)
    progress: bool = False
    threads: int | None = None  # torch threads of the worker (the CPUs it was given); None: leave them
    # the driver's Plan, for a task run in the driver's own process (the local executor): used once, so that a
    # retry plans afresh; never pickled (a Ray or Slurm worker plans the spec itself)
    plan: Any = field(default=None, compare=False, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "plan": None}

    def take_plan(self):
        """The driver's plan, once (then None)."""
        plan = self.plan
        object.__setattr__(self, "plan", None)
        return plan


@dataclass
class Outcome:
    """A task's end: its result (``run_task``'s dict) or the error that stopped it, and how often it started."""

    result: dict[str, Any] | None
    error: str | None
    attempts: int

    @property
    def ok(self) -> bool:
        return self.error is None


def new_token() -> str:
    """The token of one invocation of a multi-run command (its tasks' retries resume; a new invocation does not)."""
    return uuid.uuid4().hex


def absolute_uri(uri: str) -> str:
    """A tracking URI that means the same store from any working directory (``sqlite:///mlflow.db`` resolved
    against this one; a server's URI is kept)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri and not uri.startswith(("databricks", "file:")):
        return str(Path(uri).resolve())
    return uri


def task_for(plan, key: str, label: str, tracker, token: str, tags: Mapping[str, str] | None = None,
             progress: bool = False, keep_plan: bool = False) -> Task:
    """The task of a planned run (bench.runner.Plan), recorded in ``tracker``'s store and experiment.

    ``keep_plan``: the task carries the plan itself (its model included) for a local executor to run without
    planning again; for callers that hold their plans anyway (a sweep's), never for plans that would otherwise be
    dropped (N plans kept alive would be N models in memory)."""
    spec = plan.spec.replace(output=str(Path(plan.output).resolve()))
    kept = dataclasses.replace(plan, spec=spec, output=Path(spec.output)) if keep_plan else None
    return Task(key, label, spec.to_dict(), plan.protocol_hash, absolute_uri(tracker.uri), tracker.experiment, token,
                dict(tags or {}), progress, plan=kept)


def _starts(folder: Path, token: str) -> bool:
    """Record in the output folder that this invocation starts the task; True if it had started it before (a
    retry: resume), False if not (a fresh run, as `bench run` without --resume)."""
    path = folder / MARKER
    try:
        seen = json.loads(path.read_text())
    except (OSError, ValueError):
        seen = {}
    retry = isinstance(seen, dict) and seen.get("token") == token
    attempts = int(seen.get("attempts", 0)) + 1 if retry else 1
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{MARKER}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"token": token, "attempts": attempts}) + "\n")
    os.replace(tmp, path)
    return retry


def run_task(task: Task) -> dict[str, Any]:
    """Plan and execute one task in this process (any process: the driver, a Ray worker, a Slurm job).

    Returns ``{"error": line}`` on bad input (BenchError: not worth a retry), else the run's row: run_id,
    protocol_hash, eval_protocol_hash, output, model, dataset, method_args (canonical JSON), values. Any other
    exception propagates, for the executor to retry.
    """
    from bench.runner import execute, plan_run
    from bench.spec import RunSpec, canonical_json
    from bench.tracking import Tracker

    if task.threads:
        import torch

        torch.set_num_threads(task.threads)
    try:
        plan = task.take_plan() or plan_run(RunSpec(**task.spec))
        if plan.protocol_hash != task.protocol_hash:
            raise BenchError(f"{task.label}: this worker computes protocol {plan.protocol_hash[:12]}, the command "
                             f"planned {task.protocol_hash[:12]}: it has other code, packages or weights")
        retry = _starts(plan.output, task.token)
        result = execute(plan, Tracker(task.tracking_uri, task.experiment), progress=task.progress,
                         extra_tags=task.tags, resume=retry)
    except BenchError as exc:
        return {"error": str(exc)}
    return {"run_id": result.run_id, "protocol_hash": plan.protocol_hash, "eval_protocol_hash": plan.eval_protocol_hash,
            "output": str(result.output), "model": plan.model.name, "dataset": plan.spec.dataset,
            "method_args": canonical_json(dict(plan.spec.method_args)), "values": dict(result.values)}


def error_text(exc: BaseException) -> str:
    """One line for an exception a task raised, wherever it ran (Ray and submitit wrap it)."""
    cause = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError: the task's own exception
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc).strip()
    if text.startswith("Job (task=") and "----------------------" in text:  # submitit's FailedJobError
        trace = text.split("----------------------")[1].strip().splitlines()
        return (trace[-1] if trace else text.splitlines()[0])[:300]
    first = (text.splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


# -- executors ------------------------------------------------------------------------------------------------

OnResult = Callable[[Task, Outcome], None]


class Executor:
    """Runs tasks; ``run`` calls ``on_result`` as each task ends and returns every outcome by task key."""

    announce_ends = True  # a line as each task ends (tasks that run elsewhere, in any order)

    def __init__(self, config: ExecutorConfig, log: Callable[[str], None] | None = None):
        self.config = config
        self.log = log or (lambda line: print(line, flush=True))

    def run(self, tasks: Sequence[Task], on_result: OnResult | None = None) -> dict[str, Outcome]:
        raise NotImplementedError

    def _end(self, task: Task, outcome: Outcome, outcomes: dict[str, Outcome], total: int,
             on_result: OnResult | None) -> None:
        outcomes[task.key] = outcome
        if self.announce_ends:
            self.log(f"[{len(outcomes)}/{total} ended] {task.label}: {'done' if outcome.ok else 'failed'}")
        if on_result:
            on_result(task, outcome)

    @staticmethod
    def _outcome(returned: dict[str, Any], attempts: int) -> Outcome:
        if "error" in returned:
            return Outcome(None, returned["error"], attempts)
        return Outcome(returned, None, attempts)


class LocalExecutor(Executor):
    """In this process, one task after another (models and features a process keeps are reused across tasks)."""

    announce_ends = False  # its start lines say it

    def run(self, tasks: Sequence[Task], on_result: OnResult | None = None) -> dict[str, Outcome]:
        outcomes: dict[str, Outcome] = {}
        for i, task in enumerate(tasks, 1):
            self.log(f"[{i}/{len(tasks)}] {task.label}")
            for attempt in range(1, self.config.retries + 2):
                try:
                    outcome = self._outcome(run_task(task), attempt)
                    break
                except KeyboardInterrupt:  # Ctrl-C or SIGTERM stops the command, as in `bench run`
                    raise
                except Exception as exc:
                    outcome = Outcome(None, error_text(exc), attempt)
                    if attempt <= self.config.retries:
                        self.log(f"{task.label}: {outcome.error}; retrying (attempt {attempt + 1}, resumed)")
            self._end(task, outcome, outcomes, len(tasks), on_result)
        return outcomes


class RayExecutor(Executor):
    """Each task a Ray task (``num_cpus`` = --cpus-per-cell, one GPU for a run on cuda); Ray retries a task that
    raised or whose worker died (``max_retries``, ``retry_exceptions``). Results are taken as they finish."""

    def run(self, tasks: Sequence[Task], on_result: OnResult | None = None) -> dict[str, Outcome]:
        ray = _import("ray")
        started = not ray.is_initialized()
        if started:
            import logging

            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                       "logging_level": logging.ERROR}
            try:
                if self.config.ray_address:
                    ray.init(address=self.config.ray_address, **options)
                else:
                    ray.init(num_cpus=self.config.ray_cpus or os.cpu_count() or 1, **options)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = self.config.ray_address or "a local instance"
                raise BenchError(f"--executor ray: cannot start Ray on {where}: {error_text(exc)}") from None
        try:
            remote = ray.remote(num_cpus=self.config.cpus_per_cell, max_retries=self.config.retries,
                                retry_exceptions=True)(run_task)
            pending = {}
            for task in tasks:
                gpus = 1 if str(task.spec.get("device", "")).startswith("cuda") else 0
                task = _with_threads(task, self.config.cpus_per_cell)
                pending[remote.options(num_gpus=gpus).remote(task)] = task
            self.log(f"{len(tasks)} tasks submitted to Ray ({self.config.ray_address or 'a local instance'}, "
                     f"{self.config.cpus_per_cell} CPU each)")
            outcomes: dict[str, Outcome] = {}
            try:
                while pending:
                    (ref,), _ = ray.wait(list(pending), num_returns=1)
                    task = pending.pop(ref)
                    try:
                        outcome = self._outcome(ray.get(ref), attempts=_marker_attempts(task))
                    except Exception as exc:  # Ray's retries spent: the last error (RayTaskError, WorkerCrashedError)
                        outcome = Outcome(None, error_text(exc), self.config.retries + 1)
                    self._end(task, outcome, outcomes, len(tasks), on_result)
            except KeyboardInterrupt:  # Ctrl-C: the cells still running on a cluster stop too
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise
            return outcomes
        finally:
            if started:
                ray.shutdown()


class SlurmExecutor(Executor):
    """The tasks as one Slurm job array (submitit ``map_array``); a job that failed or was killed is submitted
    again, up to --retries times, and resumes. Job files and logs go to ``folder``."""

    def __init__(self, config: ExecutorConfig, folder: Path, log: Callable[[str], None] | None = None):
        super().__init__(config, log)
        self.folder = Path(folder)

    def parameters(self, tasks: Sequence[Task]) -> dict[str, Any]:
        c = self.config
        gpus = c.slurm_gpus_per_node
        if gpus is None:
            gpus = 1 if any(str(t.spec.get("device", "")).startswith("cuda") for t in tasks) else 0
        time_min = c.slurm_time or (LOCAL_JOB_MINUTES if c.slurm_cluster == "local" else None)
        params = {"name": "diffbench", "timeout_min": time_min, "gpus_per_node": gpus,
                  "cpus_per_task": c.slurm_cpus_per_task, "slurm_partition": c.slurm_partition,
                  "slurm_array_parallelism": c.slurm_array_parallelism}
        return {k: v for k, v in params.items() if v is not None}

    def run(self, tasks: Sequence[Task], on_result: OnResult | None = None) -> dict[str, Outcome]:
        submitit = _import("slurm")
        executor = submitit.AutoExecutor(folder=self.folder, cluster=self.config.slurm_cluster)
        executor.update_parameters(**self.parameters(tasks))
        tasks = [_with_threads(t, self.config.slurm_cpus_per_task) for t in tasks]
        jobs = executor.map_array(run_task, tasks)
        first = jobs[0].job_id if jobs else "-"
        self.log(f"{len(tasks)} tasks submitted as a job array ({executor.cluster}; job {first}, logs in {self.folder})")
        pending = [(job, task, 1) for job, task in zip(jobs, tasks)]
        outcomes: dict[str, Outcome] = {}
        try:
            self._wait(executor, pending, outcomes, len(tasks), on_result)
        except KeyboardInterrupt:  # Ctrl-C: the jobs still queued or running are cancelled
            for job, _, _ in pending:
                job.cancel(check=False)
            raise
        return outcomes

    def _wait(self, executor, pending: list, outcomes: dict[str, Outcome], total: int,
              on_result: OnResult | None) -> None:
        """Poll the jobs until each has a result, submitting a failed one again while it has retries left."""
        while pending:
            still = []
            for job, task, attempt in pending:
                if not _job_done(job):
                    still.append((job, task, attempt))
                    continue
                exc = job.exception()
                if exc is None:
                    self._end(task, self._outcome(job.result(), _marker_attempts(task)), outcomes, total,
                              on_result)
                elif attempt <= self.config.retries:
                    self.log(f"{task.label}: job {job.job_id} {error_text(exc)}; submitted again (attempt "
                             f"{attempt + 1}, resumed)")
                    still.append((executor.submit(run_task, task), task, attempt + 1))
                else:
                    self._end(task, Outcome(None, error_text(exc), attempt), outcomes, total, on_result)
            pending[:] = still
            if pending:
                time.sleep(POLL_SECONDS)


def _job_done(job) -> bool:
    try:
        return job.done()
    except Exception:  # submitit's debug executor runs the job in done() and raises its exception there
        return True


def _with_threads(task: Task, threads: int | None) -> Task:
    from dataclasses import replace

    return replace(task, threads=threads)


def _marker_attempts(task: Task) -> int:
    """How often the task started (its output folder's marker), for the report."""
    try:
        seen = json.loads((Path(task.spec["output"]) / MARKER).read_text())
        return int(seen["attempts"]) if seen.get("token") == task.token else 1
    except (OSError, ValueError, KeyError, TypeError):
        return 1


def make_executor(config: ExecutorConfig, folder: Path, log: Callable[[str], None] | None = None) -> Executor:
    """The executor of ``config``; ``folder``: the command's output folder (Slurm's job files go to folder/slurm)."""
    if config.name == "ray":
        return RayExecutor(config, log)
    if config.name == "slurm":
        return SlurmExecutor(config, Path(folder) / "slurm", log)
    return LocalExecutor(config, log)
