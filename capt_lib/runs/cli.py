"""The ``capt`` command: run notebooks, pretrain MiniCLIP, build the book, register the kernel.

    capt run NOTEBOOK [--dataset D ...] [--seed S ...] [-p NAME VALUE ...] [--runs-dir runs] [--force]
    capt pretrain [--recipe default] [--seed 0]
    capt book [--runs-dir runs] [--no-execute]
    capt kernel
    capt sweep NOTEBOOK... --dataset D... --seed S... [--backend local|slurm] [--max-parallel N]
    capt data check NAME... --root DIR [--fast]
    capt data prepare NAME --root DIR [--allow-download]

Exit codes: 0 on success, 1 when a notebook, the pretraining or the book build fails,
2 for invalid arguments or settings, such as an undeclared parameter or a missing file.
With --verbose, the traceback of the error is logged as well.
"""

from __future__ import annotations

import argparse
import ast
import logging
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)

    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as e:
        logger.debug("traceback of the error below", exc_info=True)
        print(f"capt {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as e:  # NotebookExecutionError and failed builds or loads
        logger.debug("traceback of the error below", exc_info=True)
        print(f"capt {args.command}: error: {e}", file=sys.stderr)
        return EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capt", description="Run CAPT notebooks and build the capt book.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log DEBUG messages, papermill's INFO messages and the traceback of an error")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = subcommands.add_parser("run", help="execute a notebook for each dataset and seed with papermill")
    run.add_argument("notebook", type=Path, help="source notebook, e.g. notebooks/01_confusion_discovery.ipynb")
    run.add_argument("--dataset", nargs="+", default=None, metavar="D",
                     help="dataset name(s) passed as the parameter `dataset` (default: the notebook's default)")
    run.add_argument("--seed", nargs="+", type=int, default=None, metavar="S",
                     help="seed(s) passed as the parameter `seed` (default: the notebook's default)")
    run.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                     help="set a declared parameter to VALUE, read as a YAML scalar (1, 0.5, 1e-3, true, null, text)")
    run.add_argument("--runs-dir", type=Path, default=Path("runs"),
                     help="root of the run folders <runs-dir>/<notebook>/<dataset>/seed<seed> (default: runs)")
    run.add_argument("--kernel", default=None, help="Jupyter kernel name (default: capt)")
    run.add_argument("--force", action="store_true", help="rerun even when an identical run already finished ok")
    run.add_argument("--keep-going", action="store_true", help="continue with the other runs after a failure")
    run.add_argument("--log-output", action="store_true", help="copy the notebook's output to the log while it runs")
    run.set_defaults(handler=_run_command)

    pretrain = subcommands.add_parser("pretrain", help="pretrain MiniCLIP, or reuse its cached weights")
    pretrain.add_argument("--recipe", default="default", help="MiniCLIP recipe name (default: default)")
    pretrain.add_argument("--seed", type=int, default=0, help="pretraining seed (default: 0)")
    pretrain.add_argument("--cache-dir", type=Path, default=None,
                          help="cache root (default: $CAPT_CACHE_DIR, else runs/cache)")
    pretrain.add_argument("--device", default="cpu", help="torch device for pretraining (default: cpu)")
    pretrain.set_defaults(handler=_pretrain_command)

    book = subcommands.add_parser("book", help="execute the book's notebooks, stage the book and build it")
    book.add_argument("--runs-dir", type=Path, default=Path("runs"), help="runs folder (default: runs)")
    book.add_argument("--repo-root", type=Path, default=Path("."),
                      help="folder with _config.yml, _toc.yml, book/ and notebooks/ (default: .)")
    book.add_argument("--no-execute", action="store_true",
                      help="build from the existing book runs instead of executing the notebooks first")
    book.add_argument("--kernel", default=None, help="Jupyter kernel name (default: capt)")
    book.add_argument("--force", action="store_true", help="rerun the book's notebooks even when they are up to date")
    book.set_defaults(handler=_book_command)

    from capt_lib.data.check import add_data_parser
    from capt_lib.runs.sweep import add_sweep_parser

    add_data_parser(subcommands)
    add_sweep_parser(subcommands)

    kernel = subcommands.add_parser("kernel", help="register this environment as the Jupyter kernel 'capt'")
    kernel.set_defaults(handler=_kernel_command)
    return parser


def parse_parameter_value(text: str) -> Any:
    """Read a ``-p`` value as a YAML scalar, the way ``papermill -y`` reads its values.

    Two additions cover values that YAML 1.1 reads as text but a Python user means as
    numbers or None: exponent floats without a dot (``1e-3``) and ``None``.
    """
    if text == "None":
        return None
    try:
        value = yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    if not isinstance(value, (bool, int, float, list, dict, type(None))):
        return text  # dates and other YAML types become the text as written
    return value


def _run_command(args: argparse.Namespace) -> int:
    from capt_lib.runs.papermill_runner import DEFAULT_KERNEL, declared_parameters, run_batch

    if args.log_output:
        logging.getLogger("papermill").setLevel(logging.INFO)  # papermill logs the notebook output at INFO
    parameters = {name: parse_parameter_value(value) for name, value in args.parameter}
    declared = declared_parameters(args.notebook)
    datasets = args.dataset or [_declared_default(declared, "dataset", args.notebook)]
    seeds = args.seed or [_declared_default(declared, "seed", args.notebook)]

    records = run_batch(
        args.notebook, datasets, seeds, parameters, args.runs_dir,
        kernel_name=args.kernel or DEFAULT_KERNEL, log_output=args.log_output,
        force=args.force, keep_going=args.keep_going,
    )
    for record in records:
        outcome = "reused" if record.reused else record.status
        print(f"{outcome:7s} {record.output_dir} ({record.wall_seconds} s)")

    failed = [record for record in records if record.status != "ok"]
    if failed:
        print(f"capt run: {len(failed)} of {len(records)} runs failed (details in run.json of each run folder)", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _declared_default(declared: dict, name: str, notebook: Path) -> Any:
    """Evaluate the default of parameter ``name``, which must be a literal such as 1 or 'fashion_mnist'."""
    if name not in declared:
        raise ValueError(
            f"{notebook} does not declare the parameter {name!r}; capt run passes dataset and seed to every run "
            f"(declared: {sorted(declared)})"
        )
    try:
        return ast.literal_eval(declared[name].default)
    except (ValueError, SyntaxError) as e:
        raise ValueError(
            f"{notebook}: the default of {name!r} is {declared[name].default!r}, which is not a literal; "
            f"pass --{name} explicitly"
        ) from e


def _pretrain_command(args: argparse.Namespace) -> int:
    try:
        from capt_lib.backbones.miniclip import load_miniclip
    except ImportError as e:
        raise RuntimeError(f"capt_lib.backbones.miniclip could not be imported: {e}") from e

    backbone = load_miniclip(args.recipe, seed=args.seed, cache_dir=args.cache_dir, device=args.device)
    print(f"MiniCLIP {backbone.pretrained} ready (cache key {backbone.key})")
    return EXIT_OK


def _book_command(args: argparse.Namespace) -> int:
    from capt_lib.runs.book import build_book, execute_book_notebooks, stage_book
    from capt_lib.runs.papermill_runner import DEFAULT_KERNEL

    if not (args.repo_root / "_toc.yml").is_file():
        raise FileNotFoundError(
            f"{args.repo_root / '_toc.yml'} does not exist; run capt book from the repository root or pass --repo-root"
        )
    if not args.no_execute:
        execute_book_notebooks(args.repo_root, args.runs_dir, kernel_name=args.kernel or DEFAULT_KERNEL, force=args.force)

    index = build_book(stage_book(args.repo_root, args.runs_dir))
    print(f"book: {index}")
    return EXIT_OK


def _kernel_command(args: argparse.Namespace) -> int:
    from capt_lib.runs.papermill_runner import register_kernel

    path = register_kernel()
    print(f"registered Jupyter kernel 'capt' for {sys.executable} in {path}")
    return EXIT_OK


def _configure_logging(verbose: bool) -> None:
    """Send log records to stderr, with papermill's INFO lines only under --verbose."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:
        logging.getLogger("papermill").setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
