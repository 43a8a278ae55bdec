"""``omni-ray``: the command line.

    omni-ray demo                                   tiny MiniCPM-V, 2 CPU workers, shows it learned
    omni-ray validate CONFIG [--set k=v ...]        config + freeze plan on a meta skeleton, no GPU
    omni-ray validate CONFIG --memory               + per-worker memory estimate (~1 min on a CPU)
    omni-ray validate --list-archs | --schema       supported architectures; the config's JSON schema
    omni-ray train CONFIG [--set k=v ...]           train under Ray Train (local Ray or RAY_ADDRESS)
    omni-ray data prepare SRC --out PREFIX          MiniCPM-V JSON/JSONL -> Parquet shards + manifest
    omni-ray data check [PREFIX] --config CONFIG   run the real preprocessing, report rejects (per source)
    omni-ray export CHECKPOINT --out DIR [--adapter]  merged HF model dir, or a PEFT adapter
    omni-ray report RUN [--json]                    config, freeze plan, checkpoints, metrics, where the plots are

The same command is a Ray job driver on a cluster: ``ray job submit -- omni-ray train CFG``.
Exit codes: 0 success, 1 the run failed (or another driver holds the run's lease), 2 bad config
or input (one line on stderr naming the key or path and what to do; ``--verbose`` adds the
traceback), 130 / 143 stopped by SIGINT / SIGTERM (a checkpoint at the step boundary unless
stopped at once; the same command resumes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from omni_ray.config import Config, ConfigError, load_config
from omni_ray.errors import UserError


def _config(args) -> Config:
    return load_config(args.config, args.set)


def cmd_validate(args) -> int:
    from omni_ray.freeze import format_plan
    from omni_ray.launch.driver import memory_estimate, validate

    if args.list_archs:
        from omni_ray.models.spec import all_specs

        for spec in all_specs():
            print(f"{spec.name:<18} model_type {', '.join(spec.model_types)}")
        return 0
    if args.schema:
        print(json.dumps(Config.model_json_schema(), indent=1))
        return 0
    if not args.config:
        raise ConfigError("validate: give a CONFIG file (or --list-archs / --schema)")
    cfg = _config(args)
    result = validate(cfg)
    print(f"model: {cfg.model.path} ({result.spec.name})")
    print(f"data: {describe_data(cfg)}")
    print(format_plan(result.plan, cfg.train.frozen_storage))
    print(f"strategy: {cfg.strategy.name}" + (f" ZeRO-{cfg.strategy.zero_stage}" if cfg.strategy.name == "deepspeed" else "")
          + f", {cfg.scaling.num_workers} workers, precision {cfg.train.precision}")
    if args.memory:
        print("\n".join(line for line in memory_estimate(cfg, result) if line))
    print("config ok")
    return 0


def cmd_train(args) -> int:
    from omni_ray.launch.driver import train

    import ray.train

    cfg = _config(args)
    try:
        result = train(cfg, verbose=args.verbose)
    except ray.train.TrainingFailedError as err:
        # Never exit 0 on a failed run: a job runner (ray job submit, KubeRay) must see it.
        print(f"training failed: {err}", file=sys.stderr)
        return 1
    metrics = result.metrics or {}
    print(json.dumps({"metrics": {k: v for k, v in metrics.items()
                                  if not isinstance(v, dict) or k in ("samples_by_source", "rejected_by_source")},
                      "checkpoint": result.checkpoint.path if result.checkpoint else None,
                      "run_dir": str(result.path)}, default=str))
    return 0


def cmd_demo(args) -> int:
    from omni_ray.launch.demo import run_demo

    summary = run_demo(args.workdir, num_workers=args.workers, max_steps=args.steps, verbose=args.verbose)
    if summary["accuracy_after"] < args.min_accuracy:
        print(f"[demo] accuracy {summary['accuracy_after']:.3f} is below {args.min_accuracy}", file=sys.stderr)
        return 1
    return 0


def describe_data(cfg: Config) -> str:
    """data.train resolved (existence, form, Parquet layout; no counting): one line, or a ConfigError
    naming the path (a mixture: naming the entry)."""
    from collections import Counter

    from omni_ray.data.mixture import check_sources

    parts = []
    for source in check_sources(cfg.data, cfg.storage):
        forms = Counter(u.form for u in source.units)
        share = (f" weight {source.weight:g}" if source.weight is not None else
                 f" samples {source.samples}" if source.samples is not None else "")
        parts.append(f"{source.name}{share}: " + ", ".join(f"{n} {form} unit(s)" for form, n in sorted(forms.items())))
    return "; ".join(parts)


def cmd_data_prepare(args) -> int:
    from omni_ray.data.prepare import prepare
    from omni_ray.data.reader import InputPolicy
    from omni_ray.storage import StorageConfig

    storage = StorageConfig(endpoint_url=args.endpoint_url) if args.endpoint_url else None
    policy = InputPolicy(max_image_bytes=args.max_image_bytes, image_root=args.image_root,
                         allow_absolute_paths=args.allow_absolute_paths)
    columns = None
    if args.columns:
        from omni_ray.config import ColumnsConfig, ConfigError

        try:
            columns = ColumnsConfig.model_validate(json.loads(args.columns)).model_dump()
        except ValueError as err:
            raise ConfigError(f"--columns: {' '.join(str(err).split())[:300]}; give a JSON object such as "
                              '\'{"conversation": "dialog", "images": "pictures"}\'') from None
    manifest = prepare(args.src, args.out, storage=storage, policy=policy, rows_per_shard=args.rows_per_shard,
                       max_pixels=args.max_pixels, columns=columns)
    print(json.dumps({**manifest["counts"], "duplicate_ids": manifest["duplicate_ids"]["count"]}))
    return 0


def cmd_data_check(args) -> int:
    from omni_ray.data.check import check, format_report

    cfg = _config(args)
    # No PREFIX: the config's data.train (a mixture is checked source by source).
    report = check(args.prefix or cfg.data.train, cfg.data, cfg.model, cfg.storage, seed=cfg.train.seed)
    print(format_report(report))
    return 0 if report["bad_fraction"] <= cfg.data.max_bad_fraction else 1


def cmd_export(args) -> int:
    from omni_ray.export import export
    from omni_ray.observe.console import quiet_driver
    from omni_ray.storage import StorageConfig

    quiet_driver(args.verbose)  # no weight-loading bars around the one line export prints
    storage = StorageConfig(endpoint_url=args.endpoint_url) if args.endpoint_url else None
    print(export(args.checkpoint, args.out, adapter=args.adapter, storage=storage,
                 trust_remote_code=args.trust_remote_code))
    return 0


def cmd_report(args) -> int:
    from omni_ray.observe.report import build_report, format_report
    from omni_ray.storage import StorageConfig

    storage = StorageConfig(endpoint_url=args.endpoint_url) if args.endpoint_url else None
    report = build_report(args.run, storage)
    print(json.dumps(report, indent=1, default=str) if args.json else format_report(report))
    return 0


class _Subparsers:
    """``add_parser`` that gives every subcommand the common flags (``omni-ray train CFG --verbose``)."""

    def __init__(self, action, common: argparse.ArgumentParser):
        self.action, self.common = action, common

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        return self.action.add_parser(name, parents=[self.common], **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omni-ray", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="debug logging, Ray's own output, tracebacks")
    sub = _Subparsers(parser.add_subparsers(dest="command", required=True), common)

    def with_config(p, optional: bool = False):
        p.add_argument("config", nargs="?" if optional else None, help="YAML config file")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value, e.g. --set train.lr=2e-5 (repeatable)")
        return p

    val = with_config(sub.add_parser("validate", help="check a config and print the freeze plan"), optional=True)
    val.add_argument("--list-archs", action="store_true", help="print the supported architectures and exit")
    val.add_argument("--schema", action="store_true", help="print the config's JSON schema and exit")
    # Opt-in: the activation term runs the model's forward and backward on fake tensors, which
    # takes about a minute for a 1-9B model on a CPU (no weights, no GPU).
    val.add_argument("--memory", action="store_true",
                     help="also estimate per-worker memory by component and warn above scaling.gpu_memory_gb")
    val.set_defaults(fn=cmd_validate)
    with_config(sub.add_parser("train", help="train under Ray Train")).set_defaults(fn=cmd_train)

    demo = sub.add_parser("demo", help="train a tiny MiniCPM-V on 2 CPU workers and show it learned")
    demo.add_argument("--workdir", default=os.path.expanduser("~/omni_ray_demo"))
    demo.add_argument("--workers", type=int, default=2)
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 5 epochs)")
    demo.add_argument("--min-accuracy", type=float, default=0.0, help="exit 1 below this held-out accuracy")
    demo.set_defaults(fn=cmd_demo)

    rep = sub.add_parser("report", help="a run's config, freeze plan, checkpoints, metrics, rejects, curves, eval pages")
    rep.add_argument("run", help="the run directory: run.storage_path/run.name (local or s3://)")
    rep.add_argument("--json", action="store_true", help="print the report as JSON")
    rep.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"))
    rep.set_defaults(fn=cmd_report)

    exp = sub.add_parser("export", help="checkpoint -> Hugging Face model dir (LoRA merged) or PEFT adapter")
    exp.add_argument("checkpoint", help="a checkpoint directory (local or s3://), e.g. RUN/checkpoint_...")
    exp.add_argument("--out", required=True, help="local directory or s3://bucket/prefix")
    exp.add_argument("--adapter", action="store_true", help="write a PEFT adapter instead of a merged model")
    exp.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"))
    exp.add_argument("--trust-remote-code", action="store_true",
                     help="allow the base model's own Python code (MiniCPM-V 2.x); never taken from the checkpoint")
    exp.set_defaults(fn=cmd_export)

    data = _Subparsers(sub.add_parser("data", help="prepare and check datasets").add_subparsers(
        dest="data_command", required=True), common)
    prep = data.add_parser("prepare", help="any data form (JSON/JSONL, hub Parquet, WebDataset tars) -> Parquet shards")
    prep.add_argument("src", nargs="+", help="annotation files or folders of them, read in order as one dataset")
    prep.add_argument("--out", required=True, help="local directory or s3://bucket/prefix")
    prep.add_argument("--rows-per-shard", type=int, default=512)
    prep.add_argument("--max-pixels", type=int, default=89_478_485,
                      help="reject larger images as decompression_bomb (default: PIL's limit)")
    prep.add_argument("--max-image-bytes", type=int, default=64 << 20, help="reject larger image files")
    prep.add_argument("--image-root", default=None,
                      help="folder relative image paths resolve against (default: each JSON file's folder)")
    prep.add_argument("--allow-absolute-paths", action="store_true",
                      help="accept absolute image paths and .. leaving the image root")
    prep.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"),
                      help="S3-compatible endpoint (MinIO, moto); default $AWS_ENDPOINT_URL")
    prep.add_argument("--columns", default=None, metavar="JSON",
                      help="hub Parquet in an unknown layout: data.columns as JSON, e.g. "
                      '\'{"conversation": "dialog", "images": "pictures"}\'')
    prep.set_defaults(fn=cmd_data_prepare)
    chk = data.add_parser("check", help="run the model's preprocessing over a dataset (any data form) and report")
    chk.add_argument("prefix", nargs="?", help="data in any form: prepared prefix, JSON/JSONL, hub Parquet, WebDataset "
                     ".tar shards (a file, folder, s3:// prefix or glob); default: the config's data.train (a "
                     "mixture: every source, counted per source)")
    chk.add_argument("--config", required=True, help="the training config (model, data.model_max_length, ...)")
    chk.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    chk.set_defaults(fn=cmd_data_check)
    return parser


def user_error(err: BaseException) -> str | None:
    """One line for an expected failure (bad config, storage, data, files), or None for a bug."""
    cause = getattr(err, "cause", None)  # a Ray task's error arrives wrapped (RayTaskError.cause)
    if isinstance(cause, UserError):
        return str(cause)
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        where = err.filename or str(err)
        return f"{where}: {err.strerror or err}; check the path and its permissions"
    if isinstance(err, OSError):  # pyarrow's S3 errors: network, credentials, missing bucket
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return (f"storage: {first}; check the s3:// path, storage.endpoint_url, and the credentials on this "
                "machine (AWS_* variables, a profile or an instance role)")
    return None


def main(argv: list[str] | None = None) -> int:
    from omni_ray.logs import setup_logging

    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    setup_logging(verbose)
    from omni_ray.launch.lease import LeaseHeld
    from omni_ray.launch.stops import Stopped

    try:
        return args.fn(args)
    except LeaseHeld as err:  # another driver trains this run: not a bad config, the run is refused
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Stopped as err:  # SIGINT/SIGTERM: 130/143, as a shell reports a process ended by the signal
        print(f"[omni-ray] {err}", file=sys.stderr)
        return err.exit_code
    except Exception as err:  # noqa: BLE001 - expected failures become one line and exit 2
        message = user_error(err)
        if message is None or verbose:
            raise
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
