"""The ``zeroconv`` command. It only parses and prints: each stage is ``run_<stage>(config)``.

    zeroconv [--verbose] STAGE [--config FILE.yaml] [key=value ...]
    zeroconv submit STAGE [--config FILE.yaml] [key=value ...] [submit.KEY=VALUE ...]
    zeroconv pipeline run CONFIG.yaml [key=value ...]

Every stage takes a YAML config and/or dotted overrides (``train.lr=2e-5``); ``zeroconv STAGE
--help`` lists every field with its default and meaning, generated from the stage's typed config.

The terminal shows zeroconv's progress, its result and one line per error; the libraries' logs go
to files named at the end (``pipelines.common.console``), or live with ``--verbose``.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from pydantic import BaseModel

from pipelines.common import console
from pipelines.common.config import ConfigError
from pipelines.stages import STAGES, load_stage

# Mistakes a user can fix (config, paths, data): one line naming the problem, exit status 2.
USER_ERRORS = (ConfigError, ValueError, FileNotFoundError, PermissionError)


def _field_help(model: type[BaseModel], prefix: str = "", defaults: BaseModel | None = None) -> list[str]:
    """One line per leaf field: key=default and its description. A section's defaults are the values of the
    section's own default (the demo's base_model is 'shapes', not BaseModelConfig's 'tiny')."""
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        default = getattr(defaults, name) if defaults is not None else field.get_default(call_default_factory=True)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.extend(_field_help(ann, key + ".", default if isinstance(default, BaseModel) else None))
            continue
        desc = field.description or ""
        lines.append(f"  {key}={default!r}".ljust(44) + f" {desc}")
    return lines


def stage_arguments(stage: str, config: str | None, words: list[str]) -> tuple[str | None, list[str], dict]:
    """What follows the stage name, as load_config's (config file, overrides, keyword values).

    Two stages take positionals before their key=value overrides:
      zeroconv submit STAGE [--config FILE] [key=value ...]  FILE and key=value belong to STAGE and travel
                                                             with the job; submit.KEY=VALUE configure the submission.
      zeroconv pipeline run CONFIG [key=value ...]           the same as: zeroconv pipeline --config CONFIG
      zeroconv promote NAME [key=value ...]                  the same as: zeroconv promote model=NAME
    """
    if stage == "submit":
        if not words or "=" in words[0]:
            raise ConfigError(f"usage: zeroconv submit {STAGES['submit'].usage}")
        own = [w.removeprefix("submit.") for w in words[1:] if w.startswith("submit.")]
        theirs = [w for w in words[1:] if not w.startswith("submit.")]
        return None, own, {"stage": words[0], "stage_config": config, "stage_overrides": theirs}
    if stage == "promote" and words and "=" not in words[0]:  # zeroconv promote NAME [key=value ...]
        return config, words[1:], {"model": words[0]}
    if stage == "pipeline" and words[:1] == ["run"]:
        if len(words) < 2 or "=" in words[1] or config:
            raise ConfigError(f"usage: zeroconv pipeline {STAGES['pipeline'].usage}")
        return words[1], words[2:], {}
    return config, words, {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zeroconv",
        description="Train ControlNets at scale: annotate, train, track, register, serve.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            Every stage reads a typed config: a YAML file (--config) plus key=value overrides.
            With no flags everything runs on this machine: local Ray, local files, MLflow on SQLite.
            Run 'zeroconv STAGE --help' to see a stage's fields and defaults."""),
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    parser.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="show Ray's, MLflow's and the workers' logs live (default: in log files the summary names)",
    )
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    for name, stage in STAGES.items():
        p = sub.add_parser(
            name,
            help=stage.help,
            description=stage.help,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            add_help=False,
        )
        p.add_argument("--config", "-c", metavar="FILE.yaml", help="YAML config file for this stage")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        p.add_argument("-h", "--help", action="store_true", help="show this stage's fields and exit")
        # Also accepted after the stage name; SUPPRESS keeps `zeroconv --verbose STAGE` from being reset.
        p.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep local Ray on loopback
    parser = build_parser()
    # Known args, then the rest: argparse stops filling `overrides` at the first option, and
    # key=value pairs after --config are overrides all the same.
    args, extra = parser.parse_known_args(argv)
    if any(word.startswith("-") for word in extra):
        parser.error(f"unrecognized arguments: {' '.join(w for w in extra if w.startswith('-'))}")
    if not args.stage:
        parser.print_help()
        return 0
    from pipelines.common.config import dump_config, load_config

    config_cls, run = load_stage(args.stage)
    if args.help:
        stage = STAGES[args.stage]
        print(f"usage: zeroconv {args.stage} {stage.usage}\n")
        print(stage.help + ".\n")
        if config_cls.__doc__:
            print(textwrap.dedent(config_cls.__doc__).strip() + "\n")
        print("fields (key=default  meaning):")
        print("\n".join(_field_help(config_cls)))
        return 0
    try:
        config_file, overrides, values = stage_arguments(args.stage, args.config, args.overrides + extra)
        config = load_config(config_cls, config_file, overrides, **values)
        if args.print_config:
            print(dump_config(config), end="")
            return 0
    except Exception as exc:
        if args.debug:
            raise
        return _report_error(exc)
    with console.session(verbose=args.verbose):
        try:
            result = run(config)
        except KeyboardInterrupt:
            print("interrupted: re-run the same command to resume", file=console.terminal())
            return 130
        except Exception as exc:
            if args.debug:
                raise
            return _report_error(exc)
        if result is not None:
            print(result)
        _print_log_locations()
    return getattr(result, "exit_code", 0)  # e.g. a submitted job's own exit status


def root_cause(exc: BaseException) -> BaseException:
    """The error a worker raised, out of Ray's wrappers (a task's RayTaskError, Ray Train's WorkerGroupError)."""
    while True:
        failures = getattr(exc, "worker_failures", None)  # Ray Train: rank -> the worker's exception
        inner = next(iter(failures.values()), None) if failures else getattr(exc, "cause", None)
        if not isinstance(inner, BaseException) or inner is exc:
            return exc
        exc = inner


def _report_error(exc: Exception) -> int:
    """One line on the terminal, the traceback in the log. User mistakes exit 2, anything else 1."""
    cause = root_cause(exc)
    console.log_exception(f"{type(exc).__name__}: {exc}")
    if isinstance(cause, USER_ERRORS):
        # Bad config, missing path, bad data: what to fix, not where in the code it was noticed.
        print(f"error: {str(cause).strip()}", file=console.terminal())
        return 2
    message = (str(cause).strip().splitlines() or [""])[0]
    where = console.log_locations().get("log")
    hint = f" (traceback in {where})" if where else " (run with --debug for the traceback)"
    print(f"error: {type(cause).__name__}: {message}{hint}", file=console.terminal())
    return 1


def _print_log_locations() -> None:
    locations = console.log_locations()
    if locations:
        print("logs: " + ", ".join(f"{what} {where}" for what, where in locations.items()), file=console.terminal())


if __name__ == "__main__":
    sys.exit(main())
