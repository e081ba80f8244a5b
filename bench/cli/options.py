"""Options shared by `bench run` and `bench sweep`, and the method-specific options.

Every option defaults to None so the precedence rule (CLI > --config file > RunSpec
defaults) can tell "not given" from "given".
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable

from bench.runtime import ATTENTION
from bench.spec import DEFAULT_DATASET, DEFAULT_METRICS, DEFAULT_NUM_SAMPLES, DTYPES, RunSpec


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def comma_list(text: str) -> tuple[str, ...]:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    if not items:
        raise argparse.ArgumentTypeError("must name at least one item")
    return items


def add_spec_options(p: argparse.ArgumentParser, method_required: bool = False) -> None:
    d = RunSpec()
    g = p.add_argument_group("run specification (CLI > --config file > defaults)")
    g.add_argument("--config", metavar="FILE", help="YAML or JSON file of run fields (method, steps, num_samples, ...)")
    g.add_argument("--model", help="registered model, save_pretrained folder or hub id (default: the data set's model)")
    g.add_argument("--dataset", help=f"reference data set for the metrics (default: the method's; {DEFAULT_DATASET} for "
                   "samplers, shapes32 for text-to-image methods)")
    g.add_argument("--num-samples", "-n", type=positive_int, help=f"images to generate (default: the data set's; {DEFAULT_NUM_SAMPLES}, "
                   "shapes32: 256)")
    g.add_argument("--batch-size", type=positive_int, help=f"images per batch (default: {d.batch_size})")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    g.add_argument("--dtype", choices=DTYPES, help=f"model dtype (default: {d.dtype})")
    g.add_argument("--metrics", type=comma_list, help=f"comma-separated metrics (default: the data set's; {','.join(DEFAULT_METRICS)} "
                   "for pixel data sets)")
    g.add_argument("--warmup-batches", type=non_negative_int,
                   help=f"batches of each process left out of latency (default: {d.warmup_batches})")
    g.add_argument("--attention", choices=ATTENTION, help=f"attention kernel of the denoiser (default: {d.attention}: "
                   f"diffusers' default processor, torch picks the SDPA kernel)")
    g.add_argument("--compile", action="store_const", const=True, help="torch.compile the denoiser")
    g.add_argument("--channels-last", action="store_const", const=True, help="the denoiser in channels-last memory format")
    g.add_argument("--experiment", help=f"MLflow experiment (default: {d.experiment})")
    g.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_bool(text: str) -> bool:
    try:
        return BOOLEANS[text.strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"must be true or false, got {text!r}") from None


def converter(tp: Any) -> Callable[[str], Any]:
    """The function that turns an option's text into a value of type ``tp`` (a resolved annotation).

    ``X | None`` and ``Optional[X]`` convert as X; ``Literal[...]`` accepts its values only; bool takes
    true/false/1/0/yes/no; int, float and str are themselves; anything else stays text.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return converter(inner[0]) if len(inner) == 1 else str
    if origin is typing.Literal:
        by_text = {str(v): v for v in args}

        def literal(text: str) -> Any:
            if text not in by_text:
                raise argparse.ArgumentTypeError(f"must be one of {', '.join(by_text)}, got {text!r}")
            return by_text[text]

        return literal
    if tp is bool:
        return parse_bool
    if tp in (int, float, str):
        return tp
    return str


def method_option_types(args_class: type) -> dict[str, Callable[[str], Any]]:
    """Each field of a method's Args dataclass: its converter, from the resolved type hints (not their text)."""
    hints = typing.get_type_hints(args_class)
    return {f.name: converter(hints.get(f.name, str)) for f in dataclasses.fields(args_class)}


def value_list(convert):
    """A comma list of values of one option (a sweep's grid axis): ``1,2,4`` -> (1.0, 2.0, 4.0)."""

    def parse(text: str) -> tuple:
        return tuple(convert(item) for item in comma_list(text))

    return parse


def add_method_options(p: argparse.ArgumentParser, method_name: str, only: list[str] | None = None,
                       lists: bool = False) -> list[str]:
    """Add the fields of the method's Args (or those in ``only``) as --options; return their names.

    With ``lists`` every option takes a comma list of values (``bench sweep``: each value is a grid cell).
    """
    from bench.catalog import METHODS

    cls = METHODS.get(method_name)
    g = p.add_argument_group(f"options of method {method_name!r} ({cls.paper})")
    dests = []
    converters = method_option_types(cls.Args)
    for f in dataclasses.fields(cls.Args):
        if only is not None and f.name not in only:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        convert = converters[f.name]
        g.add_argument(f"--{f.name.replace('_', '-')}", dest=f"m_{f.name}", type=value_list(convert) if lists else convert,
                       metavar=f"{f.name.upper()}[,...]" if lists else f.name.upper(), default=None,
                       help=f"{f.metadata.get('help', '')} (default: {default})".strip())
        dests.append(f.name)
    return dests


def spec_values(args: argparse.Namespace) -> dict[str, Any]:
    """The RunSpec fields given on the command line (None where not given)."""
    return {
        "model": args.model,
        "dataset": args.dataset,
        "num_samples": args.num_samples,
        "batch_size": args.batch_size,
        "device": args.device,
        "dtype": args.dtype,
        "metrics": args.metrics,
        "warmup_batches": args.warmup_batches,
        "attention": args.attention,
        "compile": args.compile,
        "channels_last": args.channels_last,
        "experiment": args.experiment,
    }


def method_values(args: argparse.Namespace, dests: list[str]) -> dict[str, Any]:
    return {d: getattr(args, f"m_{d}") for d in dests if getattr(args, f"m_{d}", None) is not None}


def scan_option(argv: list[str], name: str) -> str | None:
    """The value of ``--name`` in argv (``--name X`` or ``--name=X``), before full parsing."""
    for i, token in enumerate(argv):
        if token == name and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(name + "="):
            return token.split("=", 1)[1]
    return None


def methods_named(argv: list[str], default: str) -> tuple[str, ...]:
    """Methods named by --method (a comma list for sweeps), else by --config's file, else the default."""
    value = scan_option(argv, "--method")
    if value is None:
        config = scan_option(argv, "--config")
        if config:
            from bench.spec import load_spec_file

            value = load_spec_file(config).get("method")
            value = value if isinstance(value, str) else None  # not a name: RunSpec refuses it in one line
    return tuple(m.strip() for m in (value or default).split(",") if m.strip())


def add_executor_options(p: argparse.ArgumentParser) -> None:
    """--executor and its options (bench/executors.py; docs/scale.md), shared by sweep, nightly and claims."""
    from bench.executors import DEFAULT_RETRIES, EXECUTORS, SLURM_CLUSTERS

    g = p.add_argument_group("executor: where the runs are made (CLI > the suite's 'executor:' > defaults)")
    g.add_argument("--executor", dest="x_name", choices=EXECUTORS,
                   help="local: in this process, one after another (default); ray: each run a Ray task; slurm: "
                   "each run a job of a Slurm job array (submitit)")
    g.add_argument("--retries", dest="x_retries", type=non_negative_int,
                   help=f"attempts after the first for a run that crashed or was killed; a retry resumes it "
                   f"(default: {DEFAULT_RETRIES}; bad input is never retried)")
    g.add_argument("--ray-address", dest="x_ray_address", metavar="ADDRESS",
                   help="a running Ray cluster (ray://host:10001, host:6379 or auto; default: a local instance)")
    g.add_argument("--ray-cpus", dest="x_ray_cpus", type=positive_int, metavar="N",
                   help="CPUs of the local Ray instance (default: all)")
    g.add_argument("--cpus-per-cell", dest="x_cpus_per_cell", type=positive_int, metavar="N",
                   help="CPUs (torch threads) of each Ray task (default: 1)")
    g.add_argument("--slurm-cluster", dest="x_slurm_cluster", choices=SLURM_CLUSTERS,
                   help="submitit's cluster: slurm, local (local processes) or debug (this process); "
                   "default: what submitit detects")
    g.add_argument("--slurm-partition", dest="x_slurm_partition", metavar="NAME", help="Slurm partition")
    g.add_argument("--slurm-gpus-per-node", dest="x_slurm_gpus_per_node", type=non_negative_int, metavar="N",
                   help="GPUs of each job (default: 1 for runs on cuda, else 0)")
    g.add_argument("--slurm-cpus-per-task", dest="x_slurm_cpus_per_task", type=positive_int, metavar="N",
                   help="CPUs of each job (its torch threads)")
    g.add_argument("--slurm-time", dest="x_slurm_time", type=positive_int, metavar="MINUTES",
                   help="time limit of each job in minutes")
    g.add_argument("--slurm-array-parallelism", dest="x_slurm_array_parallelism", type=positive_int, metavar="N",
                   help="jobs of the array running at once")


def executor_values(args: argparse.Namespace) -> dict[str, Any]:
    """The ExecutorConfig fields given on the command line (None where not given)."""
    return {k[2:]: v for k, v in vars(args).items() if k.startswith("x_")}
