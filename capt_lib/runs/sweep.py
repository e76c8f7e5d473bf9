"""Sweeps: run notebooks for every dataset and seed, resumably, in parallel or on SLURM.

``plan_sweep`` turns notebooks x datasets x seeds (times an optional parameter grid)
into a list of ``SweepTask``, and ``run_sweep`` runs them. Each task is one subprocess,
``python -m capt_lib.runs.cli run NOTEBOOK --dataset D --seed S ...``, so a crash, an
exhausted GPU or a dead kernel fails that task and no other. The run folder of a task is
``<runs_dir>[/<variant>]/<notebook-stem>/<dataset>/seed<seed>`` (see
``papermill_runner.run_dir_for``), where the variant folder such as ``shots-4`` exists
only for grid sweeps.

Resuming: before a task starts, its run.json is compared with the task, by the rule of
``papermill_runner.run_notebook``. A run that finished ok with the same parameters,
kernel, notebook and capt_lib sources is skipped, so rerunning a killed sweep redoes
only what had not finished.

Report: ``<runs_dir>/sweeps/<name>.json`` lists every task with its outcome ("skipped",
"ok", "failed" or "not started"), exit code, time, log file and error, and is rewritten
atomically whenever a task starts or ends. The output of each task goes to
``<runs_dir>/sweeps/<name>/<task id>.log``.

Local backend: ``max_parallel`` tasks run at once, each with CUDA_VISIBLE_DEVICES set to
one GPU. By default there is one slot per visible GPU; with more slots than GPUs, the
slots take the GPUs in turn. Without GPUs, CUDA_VISIBLE_DEVICES is set to "" and
``max_parallel`` defaults to 1. The SLURM backend (``capt_lib.runs.slurm``) submits the
tasks as a job array through submitit.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import itertools
import json
import logging
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tqdm.auto import tqdm

from capt_lib.runs.papermill_runner import (
    DEFAULT_KERNEL,
    OUTPUT_DIR_PARAMETER,
    RunRecord,
    rerun_reason,
    with_output_dir,
    declared_parameters,
    library_source_sha256,
    read_run_record,
    run_dir_for,
)
from capt_lib.runs.slurm import SlurmSettings
from capt_lib.utils.cache import file_sha256
from capt_lib.utils.io import atomic_write_json

logger = logging.getLogger(__name__)

BACKENDS = ("local", "slurm")
SWEEPS_DIR = "sweeps"  # folder under runs_dir with the sweep reports and task logs
RESERVED_PARAMETERS = ("dataset", "seed", OUTPUT_DIR_PARAMETER)  # set per task by the sweep and the runner
VARIANT_VALUE = re.compile(r"^[A-Za-z0-9._+-]+$")  # grid values that can name a folder
LOG_TAIL_LINES = 5  # lines of a task's log quoted as its error when run.json has none

OUTCOMES = ("pending", "running", "skipped", "ok", "failed", "not started")


@dataclass(frozen=True)
class SweepTask:
    """One notebook run of a sweep."""

    notebook: str  # source notebook, relative to the sweep's working directory or absolute
    dataset: str  # value of the notebook parameter `dataset`
    seed: int  # value of the notebook parameter `seed`
    parameters: Mapping[str, Any]  # the other notebook parameters, grid values included
    runs_dir: str  # root of the run folders, whose sweeps/ folder receives the sweep report
    variant: str = ""  # grid folder such as "shots-4", "" without a grid
    kernel_name: str = DEFAULT_KERNEL  # Jupyter kernel that executes the notebook

    @property
    def variant_runs_dir(self) -> Path:
        """Return the ``--runs-dir`` of this task: ``runs_dir``, plus the variant folder for a grid."""
        return Path(self.runs_dir) / self.variant if self.variant else Path(self.runs_dir)

    @property
    def run_dir(self) -> Path:
        return run_dir_for(self.variant_runs_dir, self.notebook, self.dataset, self.seed)

    @property
    def task_id(self) -> str:
        """Return the name of the task in reports and logs, e.g. ``01_capt/shots-4/dtd/seed1``."""
        parts = [Path(self.notebook).stem, self.variant, self.dataset, f"seed{self.seed}"]
        return "/".join(part for part in parts if part)

    def command(self, *, python: str | None = None, force: bool = False) -> list[str]:
        """Return the argv of ``capt run`` for this task, run through ``python -m capt_lib.runs.cli``."""
        command = [
            python or sys.executable, "-m", "capt_lib.runs.cli", "run", str(self.notebook),
            "--dataset", self.dataset, "--seed", str(self.seed),
            "--runs-dir", str(self.variant_runs_dir), "--kernel", self.kernel_name,
        ]
        for name, value in self.parameters.items():
            command += ["-p", name, parameter_text(name, value)]
        if force:
            command.append("--force")
        return command


@dataclass(frozen=True)
class TaskOutcome:
    """Outcome of one sweep task, as recorded in the report."""

    task_id: str  # SweepTask.task_id
    run_dir: str  # run folder with run.json and the executed notebook
    outcome: str  # "pending", "running", "skipped", "ok", "failed" or "not started"
    device: str | None = None  # CUDA_VISIBLE_DEVICES of the task ("" for CPU), or None on SLURM and before it runs
    job_id: str | None = None  # submitit job id on the SLURM backend
    exit_code: int | None = None  # exit code of the task's `capt run` process
    started_at: str | None = None  # ISO 8601 UTC time the task started or was submitted
    wall_seconds: float | None = None  # subprocess time (local) or the run record's time (SLURM)
    log: str | None = None  # file with the output of the task
    error: str | None = None  # failing exception from run.json, or the end of the log


@dataclass
class SweepReport:
    """The outcome of every task of a sweep, written to ``<runs_dir>/sweeps/<name>.json``."""

    name: str  # sweep name, the report's file stem
    path: Path  # report file
    backend: str  # "local" or "slurm"
    started_at: str  # ISO 8601 UTC time the sweep started
    options: dict[str, Any]  # max_parallel, GPUs, keep_going, force, SLURM settings
    tasks: list[SweepTask]  # the planned tasks, in order
    outcomes: list[TaskOutcome]  # one per task, in the same order
    status: str = "running"  # "running", then "finished", "stopped" (first failure) or "interrupted"
    finished_at: str | None = None  # ISO 8601 UTC time the sweep ended

    def count(self, outcome: str) -> int:
        return sum(1 for item in self.outcomes if item.outcome == outcome)

    @property
    def failed(self) -> list[TaskOutcome]:
        return [item for item in self.outcomes if item.outcome == "failed"]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backend": self.backend,
            "status": self.status,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "options": self.options,
            "counts": {outcome: self.count(outcome) for outcome in OUTCOMES},
            "tasks": [
                {
                    **dataclasses.asdict(outcome),
                    "notebook": task.notebook,
                    "dataset": task.dataset,
                    "seed": task.seed,
                    "variant": task.variant,
                    "parameters": dict(task.parameters),
                    "kernel_name": task.kernel_name,
                }
                for task, outcome in zip(self.tasks, self.outcomes)
            ],
        }

    def write(self) -> Path:
        return atomic_write_json(self.path, self.to_json())


def plan_sweep(
    notebooks: Iterable[str | os.PathLike],
    datasets: Iterable[str],
    seeds: Iterable[int],
    base_parameters: Mapping[str, Any] | None,
    runs_dir: str | os.PathLike,
    *,
    grid: Mapping[str, Sequence[Any]] | None = None,
    kernel_name: str = DEFAULT_KERNEL,
) -> list[SweepTask]:
    """Return one task per notebook x grid point x dataset x seed, in that nesting order.

    ``grid`` maps further notebook parameters to the values to sweep. Each grid point
    gets its own runs folder ``<runs_dir>/<name>-<value>[_<name>-<value>...]``, because
    a run folder is named by notebook, dataset and seed only.

    Raises FileNotFoundError for a missing notebook, and ValueError for empty or repeated
    lists, a parameter that a notebook does not declare, a reserved parameter (dataset,
    seed, output_dir), or a value that ``capt run -p`` would not read back unchanged.
    """
    notebooks = [str(notebook) for notebook in notebooks]
    datasets = [str(dataset) for dataset in datasets]
    seeds = [int(seed) for seed in seeds]
    for label, values in (("notebooks", notebooks), ("datasets", datasets), ("seeds", seeds)):
        _check_unique(label, values)
    base_parameters = dict(base_parameters or {})
    grid = {name: list(values) for name, values in (grid or {}).items()}

    _check_parameter_names(base_parameters, grid)
    for name, value in base_parameters.items():
        parameter_text(name, value)
    for name, values in grid.items():
        _check_unique(f"grid values of {name!r}", values)
        for value in values:
            parameter_text(name, value)
            if not VARIANT_VALUE.match(str(value)):
                raise ValueError(f"grid value {name}={value!r} cannot name a folder; use letters, digits and . _ + -")
    for notebook in notebooks:
        _check_declared(notebook, set(base_parameters) | set(grid))

    tasks = []
    for notebook in notebooks:
        for point in itertools.product(*grid.values()):
            grid_values = dict(zip(grid, point))
            variant = "_".join(f"{name}-{value}" for name, value in grid_values.items())
            for dataset in datasets:
                for seed in seeds:
                    tasks.append(SweepTask(
                        notebook=notebook, dataset=dataset, seed=seed,
                        parameters={**base_parameters, **grid_values}, runs_dir=str(runs_dir),
                        variant=variant, kernel_name=kernel_name,
                    ))
    return tasks


def run_sweep(
    tasks: Sequence[SweepTask],
    *,
    backend: str = "local",
    max_parallel: int | None = None,
    gpus: Sequence[str | int] | None = None,
    keep_going: bool = True,
    force: bool = False,
    name: str | None = None,
    cwd: str | os.PathLike | None = None,
    python: str | None = None,
    slurm: SlurmSettings | None = None,
    slurm_cluster: str = "slurm",
    progress: bool = True,
) -> SweepReport:
    """Run ``tasks``, skipping finished runs, and return the report (also written to disk).

    ``gpus`` lists the GPU ids for the local backend (None: the visible GPUs, an empty
    list: CPU only). ``keep_going=False`` stops starting tasks after the first failure.
    ``force`` reruns finished runs. ``cwd`` is the working directory of the tasks
    (default: the current one), which relative paths in the tasks and inside notebooks
    resolve against. ``slurm`` is a ``SlurmSettings`` (default: its defaults) and
    ``slurm_cluster`` one of "slurm", "local" or "debug" (submitit's local executors,
    for tests). Failed tasks do not raise: they are in ``report.failed``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid; choose one of {list(BACKENDS)}")
    if not tasks:
        raise ValueError("run_sweep: tasks is empty; plan_sweep returns the tasks of a sweep")
    if len({task.runs_dir for task in tasks}) > 1:
        raise ValueError(f"the tasks of one sweep must share runs_dir, got {sorted({task.runs_dir for task in tasks})}")
    _check_unique("task ids", [task.task_id for task in tasks])

    cwd = Path(cwd or os.getcwd()).resolve()
    runs_root = _absolute(cwd, tasks[0].runs_dir)
    name = name or _new_sweep_name(runs_root / SWEEPS_DIR)
    slots = device_slots(gpus, max_parallel) if backend == "local" else []
    slurm = slurm or SlurmSettings()
    report = SweepReport(
        name=name,
        path=runs_root / SWEEPS_DIR / f"{name}.json",
        backend=backend,
        started_at=_utc_now(),
        options={
            "max_parallel": max_parallel, "devices": slots, "keep_going": keep_going, "force": force,
            "cwd": str(cwd), "slurm": dataclasses.asdict(slurm) if backend == "slurm" else None,
            "slurm_cluster": slurm_cluster if backend == "slurm" else None,
        },
        tasks=list(tasks),
        outcomes=[TaskOutcome(task.task_id, str(task.run_dir), "pending") for task in tasks],
    )
    report.write()

    pending = _skip_finished(report, cwd, force)
    logger.info(
        "sweep %s: %d tasks, %d finished earlier, %d to run on the %s backend; report %s",
        name, len(tasks), len(tasks) - len(pending), len(pending), backend, report.path,
    )
    runner = _TaskRunner(report, cwd, runs_root / SWEEPS_DIR / name, python or sys.executable, force)
    try:
        if backend == "local":
            stopped = _run_local(runner, pending, slots, keep_going, progress)
        else:
            stopped = _run_slurm(runner, pending, slurm, slurm_cluster, keep_going, progress)
    except BaseException:
        _finish(report, "interrupted")
        raise
    _finish(report, "stopped" if stopped else "finished")
    logger.info(
        "sweep %s %s: %d ok, %d skipped, %d failed, %d not started",
        name, report.status, report.count("ok"), report.count("skipped"), report.count("failed"),
        report.count("not started"),
    )
    return report


def visible_gpus() -> list[str]:
    """Return the GPU ids this process may use: CUDA_VISIBLE_DEVICES when set, else nvidia-smi's indices."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        ids = [part.strip() for part in value.split(",") if part.strip()]
        # CUDA ignores the ids from the first negative one on, so "-1" hides every GPU.
        return list(itertools.takewhile(lambda gpu: not gpu.startswith("-"), ids))

    # NOTE: only NVIDIA GPUs are detected, so pass gpus=[...] for other accelerators.
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True, text=True, check=True, timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as e:
        logger.warning("nvidia-smi failed, so the sweep runs without GPUs: %s", e)
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def device_slots(gpus: Sequence[str | int] | None, max_parallel: int | None) -> list[str]:
    """Return the CUDA_VISIBLE_DEVICES value of each parallel slot ("" for a CPU slot).

    One slot per GPU by default; ``max_parallel`` sets the number of slots, which take
    the GPUs in turn. Without GPUs there are ``max_parallel`` CPU slots, 1 by default.
    """
    if max_parallel is not None and max_parallel < 1:
        raise ValueError(f"max_parallel={max_parallel} is invalid; it must be at least 1")
    gpu_ids = visible_gpus() if gpus is None else [str(gpu) for gpu in gpus]
    if not gpu_ids:
        return [""] * (max_parallel or 1)
    count = max_parallel or len(gpu_ids)
    return [gpu_ids[slot % len(gpu_ids)] for slot in range(count)]


def parameter_text(name: str, value: Any) -> str:
    """Return ``value`` as the text of ``capt run -p NAME VALUE``, which must read back unchanged.

    The text is JSON, which is also YAML, the syntax ``capt run`` reads. Raises
    ValueError for a value that would arrive changed, such as the string "1e-3" (read
    as a number) or NaN.
    """
    from capt_lib.runs.cli import parse_parameter_value

    try:
        text = json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"parameter {name}={value!r} is not JSON-serialisable, so capt run cannot receive it") from e
    received = parse_parameter_value(text)
    if json.dumps(received) != text:
        raise ValueError(
            f"parameter {name}={value!r} would reach the notebook as {received!r} through `capt run -p`; "
            "pass a value that reads back unchanged (for example a number instead of numeric text)"
        )
    return text


class _TaskRunner:
    """Starts tasks and turns their ends into outcomes, updating the report under a lock."""

    def __init__(self, report: SweepReport, cwd: Path, log_dir: Path, python: str, force: bool):
        self.report = report
        self.cwd = cwd
        self.log_dir = log_dir
        self.python = python
        self.force = force
        self.lock = threading.Lock()

    def log_path(self, task: SweepTask) -> Path:
        return self.log_dir / f"{task.task_id}.log"

    def mark(self, index: int, **changes: Any) -> None:
        with self.lock:
            self.report.outcomes[index] = dataclasses.replace(self.report.outcomes[index], **changes)
            self.report.write()

    def run_local(self, index: int, device: str) -> TaskOutcome:
        """Run task ``index`` in a subprocess with CUDA_VISIBLE_DEVICES set to ``device``, then record its end."""
        task = self.report.tasks[index]
        log_path = self.log_path(task)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        command = task.command(python=self.python, force=self.force)
        self.mark(index, outcome="running", device=device, started_at=_utc_now(), log=str(log_path))

        start = time.perf_counter()
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": device, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "ab") as log:
            log.write(f"$ CUDA_VISIBLE_DEVICES={device!r} {' '.join(command)}\n".encode())
            log.flush()
            try:
                completed = subprocess.run(command, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
            except OSError as e:  # the interpreter or the working directory is missing
                return self.finish(index, None, round(time.perf_counter() - start, 3), f"could not start {command[0]}: {e}")
        return self.finish(index, completed.returncode, round(time.perf_counter() - start, 3), None)

    def finish(self, index: int, exit_code: int | None, wall_seconds: float | None, job_error: str | None) -> TaskOutcome:
        """Record the end of task ``index`` from its exit code and run.json."""
        task = self.report.tasks[index]
        record = _read_record(_absolute(self.cwd, task.run_dir))
        ok = exit_code == 0 and record is not None and record.status == "ok"
        if wall_seconds is None and record is not None:
            wall_seconds = record.wall_seconds
        error = None if ok else job_error or _describe_error(record, exit_code, self.log_path(task))
        if not ok:
            logger.error("task %s failed (exit code %s): %s", task.task_id, exit_code, error)
        self.mark(index, outcome="ok" if ok else "failed", exit_code=exit_code, wall_seconds=wall_seconds, error=error)
        return self.report.outcomes[index]


def _run_local(runner: _TaskRunner, pending: list[int], slots: list[str], keep_going: bool, progress: bool) -> bool:
    """Run the ``pending`` task indices over ``slots``; return True when a failure stopped the sweep."""
    free_slots: queue.Queue[str] = queue.Queue()
    for device in slots:
        free_slots.put(device)
    stop = threading.Event()

    def work(index: int) -> None:
        device = free_slots.get()
        try:
            if stop.is_set():
                runner.mark(index, outcome="not started")
                return
            outcome = runner.run_local(index, device)
        finally:
            free_slots.put(device)
        if outcome.outcome == "failed" and not keep_going:
            stop.set()

    pool = ThreadPoolExecutor(max_workers=max(1, len(slots)), thread_name_prefix="sweep")
    try:
        futures = [pool.submit(work, index) for index in pending]
        with tqdm(total=len(futures), desc=f"sweep {runner.report.name}", disable=not progress) as bar:
            for future in as_completed(futures):
                future.result()
                bar.update(1)
    except BaseException:
        # Without this, shutting the pool down would still start every queued task.
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return stop.is_set()


def _run_slurm(
    runner: _TaskRunner, pending: list[int], settings: SlurmSettings, cluster: str, keep_going: bool, progress: bool
) -> bool:
    """Submit the ``pending`` task indices as one job array; return True when a failure stopped the sweep."""
    from capt_lib.runs.slurm import JobSpec, cancel_jobs, make_executor, submit_jobs, wait_for_jobs

    if not pending:
        return False
    specs = []
    for index in pending:
        task = runner.report.tasks[index]
        command = tuple(task.command(python=runner.python, force=runner.force))
        specs.append(JobSpec(task.task_id, command, str(runner.cwd), str(runner.log_path(task)), {"PYTHONUNBUFFERED": "1"}))

    executor = make_executor(runner.log_dir / "submitit", settings, cluster=cluster, name=f"capt-{runner.report.name}")
    jobs = submit_jobs(executor, specs)
    for index, job, spec in zip(pending, jobs, specs):
        runner.mark(index, outcome="running", job_id=str(job.job_id), started_at=_utc_now(), log=spec.log_path)

    stopped = False
    with tqdm(total=len(jobs), desc=f"sweep {runner.report.name}", disable=not progress) as bar:
        for position, exit_code, job_error in wait_for_jobs(jobs, cluster):
            outcome = runner.finish(pending[position], exit_code, None, job_error)
            bar.update(1)
            if outcome.outcome == "failed" and not keep_going:
                stopped = True
                cancel_jobs(jobs)
                break
    if stopped:
        for index in pending:
            if runner.report.outcomes[index].outcome == "running":
                runner.mark(index, outcome="not started", error="cancelled after the first failure")
    return stopped


def _skip_finished(report: SweepReport, cwd: Path, force: bool) -> list[int]:
    """Mark tasks whose run finished ok with the same inputs as skipped; return the others' indices."""
    if force:
        return list(range(len(report.tasks)))
    library_sha256 = library_source_sha256()
    notebook_inputs: dict[str, tuple] = {}
    pending = []
    for index, task in enumerate(report.tasks):
        run_dir = _absolute(cwd, task.run_dir)
        previous = _read_record(run_dir)
        if previous is None:
            pending.append(index)
            continue

        notebook = _absolute(cwd, task.notebook)
        if task.notebook not in notebook_inputs:
            notebook_inputs[task.notebook] = (declared_parameters(notebook), file_sha256(notebook))
        declared, notebook_sha256 = notebook_inputs[task.notebook]
        parameters = with_output_dir(run_dir, {**task.parameters, "dataset": task.dataset, "seed": task.seed}, declared)
        output_notebook = run_dir / f"{notebook.stem}.ipynb"
        reason = rerun_reason(previous, parameters, task.kernel_name, notebook_sha256, library_sha256, output_notebook)
        if reason is None:
            report.outcomes[index] = dataclasses.replace(
                report.outcomes[index], outcome="skipped", wall_seconds=previous.wall_seconds
            )
        else:
            logger.info("task %s reruns because %s", task.task_id, reason)
            pending.append(index)
    report.write()
    return pending


def _finish(report: SweepReport, status: str) -> None:
    """Close the report: tasks never started become "not started", tasks cut off become "failed"."""
    for index, outcome in enumerate(report.outcomes):
        if outcome.outcome == "pending":
            report.outcomes[index] = dataclasses.replace(outcome, outcome="not started")
        elif outcome.outcome == "running":
            error = outcome.error or f"the sweep was {status} before the task ended"
            report.outcomes[index] = dataclasses.replace(outcome, outcome="failed", error=error)
    report.status = status
    report.finished_at = _utc_now()
    report.write()


def _read_record(run_dir: Path) -> RunRecord | None:
    """Return the RunRecord in ``run_dir``, or None when there is none or it cannot be read."""
    try:
        return read_run_record(run_dir)
    except (ValueError, TypeError) as e:  # invalid JSON, or fields that RunRecord does not accept
        logger.warning("ignoring the unreadable run record in %s, so the run counts as unfinished: %s", run_dir, e)
        return None


def _describe_error(record: RunRecord | None, exit_code: int | None, log_path: Path) -> str:
    """Say why a task failed: the failing cell's exception from run.json, else the end of its log."""
    if record is not None and record.status == "failed" and record.error:
        return f"{record.error.get('ename')}: {record.error.get('evalue')}"
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    tail = " | ".join(line.strip() for line in lines[-LOG_TAIL_LINES:] if line.strip())
    return f"exit code {exit_code}: {tail}" if tail else f"exit code {exit_code} and no output"


def _check_unique(label: str, values: Sequence[Any]) -> None:
    if not values:
        raise ValueError(f"{label} is empty; a sweep needs at least one")
    repeated = sorted({str(value) for value in values if values.count(value) > 1})
    if repeated:
        raise ValueError(f"{label} lists {repeated} more than once")


def _check_parameter_names(base_parameters: Mapping[str, Any], grid: Mapping[str, Any]) -> None:
    for label, names in (("base_parameters", base_parameters), ("grid", grid)):
        reserved = sorted(set(RESERVED_PARAMETERS) & set(names))
        if reserved:
            raise ValueError(
                f"{label} must not set {reserved}: the sweep sets dataset and seed per task and the runner "
                f"sets {OUTPUT_DIR_PARAMETER} to the run folder"
            )
    both = sorted(set(base_parameters) & set(grid))
    if both:
        raise ValueError(f"parameters {both} are set both in base_parameters and in grid; set each in one place")


def _check_declared(notebook: str, names: set[str]) -> None:
    declared = declared_parameters(notebook)
    missing = sorted({"dataset", "seed"} - set(declared))
    if missing:
        raise ValueError(f"{notebook} does not declare {missing}; a sweep passes dataset and seed to every run")
    undeclared = sorted(names - set(declared))
    if undeclared:
        raise ValueError(f"{notebook} does not declare the parameter(s) {undeclared}; it declares {sorted(declared)}")


def _absolute(cwd: Path, path: str | os.PathLike) -> Path:
    path = Path(path)
    return path if path.is_absolute() else cwd / path


def _new_sweep_name(sweeps_dir: Path) -> str:
    """Return a UTC timestamp name that no report in ``sweeps_dir`` uses yet."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for suffix in itertools.count():
        name = stamp if suffix == 0 else f"{stamp}-{suffix}"
        if not (sweeps_dir / f"{name}.json").exists():
            return name
    raise AssertionError("unreachable")


def _utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------------------------------
# The `capt sweep` subcommand. capt_lib.runs.cli registers it with add_sweep_parser.
# ---------------------------------------------------------------------------------------


def add_sweep_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``sweep`` subcommand to the ``capt`` parser; its handler is ``run_sweep_command``."""
    sweep = subparsers.add_parser(
        "sweep", help="run notebooks for each dataset and seed, skipping finished runs, in parallel or on SLURM"
    )

    sweep.add_argument("notebooks", nargs="+", type=Path, metavar="NOTEBOOK", help="source notebook(s)")
    sweep.add_argument("--dataset", nargs="+", default=None, metavar="D",
                       help="dataset name(s) (default with --protocol: the protocol's datasets)")
    sweep.add_argument("--seed", nargs="+", type=int, default=None, metavar="S",
                       help="seed(s) (default with --protocol: the protocol's seeds)")
    sweep.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                       help="set a declared parameter to VALUE, read as a YAML scalar (1, 0.5, 1e-3, true, null, text)")
    sweep.add_argument("--grid", nargs="+", action="append", default=[], metavar=("NAME", "VALUE"),
                       help="also sweep parameter NAME over the VALUEs; runs go to <runs-dir>/<NAME>-<VALUE>/")

    sweep.add_argument("--protocol", default=None,
                       help="protocol preset (configs/presets); passed as the parameter `protocol`")
    sweep.add_argument("--method", default=None,
                       help="method preset (configs/presets); passed as the parameter `method`")

    sweep.add_argument("--backend", choices=BACKENDS, default="local", help="where tasks run (default: local)")
    sweep.add_argument("--max-parallel", type=int, default=None, metavar="N",
                       help="tasks at once on the local backend (default: one per visible GPU, 1 without GPUs)")
    sweep.add_argument("--gpus", nargs="+", default=None, metavar="ID",
                       help="GPU ids for the local backend, or `none` for CPU only (default: the visible GPUs)")
    sweep.add_argument("--runs-dir", type=Path, default=Path("runs"), help="root of the run folders (default: runs)")
    sweep.add_argument("--kernel", default=None, help="Jupyter kernel name (default: capt)")
    sweep.add_argument("--name", default=None, help="sweep name, the report's file stem (default: a UTC timestamp)")
    sweep.add_argument("--force", action="store_true", help="rerun runs that already finished ok")
    sweep.add_argument("--stop-on-failure", action="store_true", help="start no further task after a failure")

    sweep.add_argument("--slurm-preset", default="slurm", help="slurm preset with the resources (default: slurm)")
    sweep.add_argument("--slurm-partition", default=None, help="SLURM partition (overrides the preset)")
    sweep.add_argument("--slurm-gpus", type=int, default=None, help="GPUs per task (overrides the preset)")
    sweep.add_argument("--slurm-cpus", type=int, default=None, help="CPU cores per task (overrides the preset)")
    sweep.add_argument("--slurm-time", type=int, default=None, metavar="MIN",
                       help="time limit per task in minutes (overrides the preset)")
    sweep.add_argument("--slurm-mem", type=int, default=None, metavar="GB",
                       help="memory per task in GiB (overrides the preset)")
    sweep.add_argument("--slurm-cluster", choices=("slurm", "local", "debug"), default="slurm",
                       help="submitit executor: slurm, or local/debug to try the SLURM path on this machine")

    sweep.set_defaults(handler=run_sweep_command)
    return sweep


def run_sweep_command(args: argparse.Namespace) -> int:
    """Run ``capt sweep`` from parsed arguments; return 0 when no task failed, else 1."""
    from capt_lib.runs.cli import EXIT_FAILED, EXIT_OK, parse_parameter_value

    parameters = {name: parse_parameter_value(value) for name, value in args.parameter}
    grid = {}
    for values in args.grid:
        if len(values) < 2:
            raise ValueError(f"--grid {' '.join(values)}: give a parameter name and at least one value")
        grid[values[0]] = [parse_parameter_value(value) for value in values[1:]]
    datasets, seeds = _sweep_axes(args, parameters, grid)

    tasks = plan_sweep(
        args.notebooks, datasets, seeds, parameters, args.runs_dir, grid=grid,
        kernel_name=args.kernel or DEFAULT_KERNEL,
    )
    gpus = [] if args.gpus == ["none"] else args.gpus
    report = run_sweep(
        tasks, backend=args.backend, max_parallel=args.max_parallel, gpus=gpus,
        keep_going=not args.stop_on_failure, force=args.force, name=args.name,
        slurm=_slurm_settings(args) if args.backend == "slurm" else None, slurm_cluster=args.slurm_cluster,
    )

    for outcome in report.outcomes:
        seconds = "" if outcome.wall_seconds is None else f" ({outcome.wall_seconds} s)"
        error = f": {outcome.error}" if outcome.error and outcome.outcome != "skipped" else ""
        print(f"{outcome.outcome:11s} {outcome.run_dir}{seconds}{error}")
    print(
        f"sweep {report.name}: {report.count('ok')} ok, {report.count('skipped')} skipped, "
        f"{report.count('failed')} failed, {report.count('not started')} not started; report {report.path}"
    )
    return EXIT_FAILED if report.failed or report.count("not started") else EXIT_OK


def _sweep_axes(args: argparse.Namespace, parameters: dict, grid: dict) -> tuple[list[str], list[int]]:
    """Return the datasets and seeds; with --protocol, fill defaults, parameters and the shots grid from it."""
    from capt_lib.runs.presets import load_preset, resolve_run_settings

    if args.protocol is None:
        if args.method is not None:
            raise ValueError("--method needs --protocol, because a method's settings depend on the protocol")
        if not args.dataset or not args.seed:
            raise ValueError("capt sweep needs --dataset and --seed, or a --protocol that lists them")
        return args.dataset, args.seed

    protocol = load_preset(args.protocol)
    if protocol["kind"] != "protocol":
        raise ValueError(f"--protocol {args.protocol}: that preset is a {protocol['kind']} preset, not a protocol")
    datasets = args.dataset or protocol["datasets"]
    seeds = args.seed or protocol["seeds"]
    parameters["protocol"] = args.protocol
    if args.method is not None:
        parameters["method"] = args.method
    if len(protocol["shots"]) > 1 and "shots" not in grid and "shots" not in parameters:
        grid["shots"] = list(protocol["shots"])

    if args.method is not None:
        # Resolve the settings once per dataset and shot count, so an invalid combination fails before any run starts.
        for dataset, shots in itertools.product(datasets, grid.get("shots", [parameters.get("shots")])):
            overrides = {} if shots is None else {"shots": shots}
            try:
                resolve_run_settings(args.protocol, args.method, dataset, seeds[0], overrides)
            except NotImplementedError as e:
                raise ValueError(str(e)) from e
    return datasets, seeds


def _slurm_settings(args: argparse.Namespace) -> SlurmSettings:
    from capt_lib.runs.presets import load_preset

    preset = load_preset(args.slurm_preset)
    if preset["kind"] != "slurm":
        raise ValueError(f"--slurm-preset {args.slurm_preset}: that preset is a {preset['kind']} preset, not a slurm preset")
    values = {key: value for key, value in preset.items() if key not in ("kind", "name", "description")}
    changes = {
        "partition": args.slurm_partition, "gpus_per_task": args.slurm_gpus, "cpus_per_task": args.slurm_cpus,
        "time_min": args.slurm_time, "mem_gb": args.slurm_mem,
    }
    values.update({key: value for key, value in changes.items() if value is not None})
    return SlurmSettings(**values)
