"""SLURM backend of ``capt sweep``, through submitit.

The tasks of a sweep become one SLURM job array. Each array element runs its task's
command (``python -m capt_lib.runs.cli run ...``) in a subprocess on the compute node,
with the output in the task's log file, and returns the exit code. The node needs the
same file system paths as the submitting machine: the working directory, the Python
interpreter and the runs folder.

Without a cluster, ``cluster="local"`` runs the same jobs through submitit's
LocalExecutor (one process per job on this machine) and ``cluster="debug"`` through its
DebugExecutor (in this process, one after the other). The tests use those two, because
no SLURM cluster is available where they run. SLURM itself sets CUDA_VISIBLE_DEVICES for
each job, so this backend never sets it.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

logger = logging.getLogger(__name__)

CLUSTERS = ("slurm", "local", "debug")
POLL_SECONDS = {"slurm": 30.0, "local": 1.0, "debug": 0.0}  # how often job states are checked


@dataclass(frozen=True)
class SlurmSettings:
    """Resources requested for each task of a sweep on SLURM."""

    partition: str | None = None  # SLURM partition (sbatch --partition), or None for the cluster's default
    gpus_per_task: int = 1  # GPUs per task, each task being a single-node job
    cpus_per_task: int = 8  # CPU cores per task
    mem_gb: int = 64  # memory per task in GiB
    time_min: int = 240  # wall-clock limit per task in minutes
    array_parallelism: int = 16  # array tasks that may run at the same time
    account: str | None = None  # SLURM account (sbatch --account), or None for the user's default

    def __post_init__(self):
        for name in ("cpus_per_task", "mem_gb", "time_min", "array_parallelism"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SlurmSettings.{name}={value!r} is invalid; it must be a positive integer")
        if not isinstance(self.gpus_per_task, int) or isinstance(self.gpus_per_task, bool) or self.gpus_per_task < 0:
            raise ValueError(f"SlurmSettings.gpus_per_task={self.gpus_per_task!r} is invalid; it must be 0 or more")


@dataclass(frozen=True)
class JobSpec:
    """Command, working directory and log file of one array element."""

    task_id: str  # the sweep task, e.g. "01_capt/fashion_mnist/seed1"
    command: tuple[str, ...]  # argv of the subprocess
    cwd: str  # working directory of the subprocess
    log_path: str  # file that receives the subprocess's stdout and stderr
    env: dict[str, str] = field(default_factory=dict)  # variables added to the job's environment


def run_command_job(spec: JobSpec) -> int:
    """Run ``spec.command`` with its output in ``spec.log_path`` and return its exit code.

    This is the function each job executes, on the compute node.
    """
    log_path = Path(spec.log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        completed = subprocess.run(
            list(spec.command), cwd=spec.cwd, env={**os.environ, **spec.env}, stdout=log, stderr=subprocess.STDOUT
        )
    return completed.returncode


def make_executor(folder: str | os.PathLike, settings: SlurmSettings, *, cluster: str = "slurm", name: str = "capt-sweep"):
    """Return a submitit AutoExecutor for ``cluster`` with ``settings`` applied.

    Raises ValueError for an unknown cluster and RuntimeError when ``cluster="slurm"``
    but ``sbatch`` is not on PATH, so a sweep never falls back to this machine silently.
    """
    import submitit

    if cluster not in CLUSTERS:
        raise ValueError(f"cluster={cluster!r} is invalid; choose one of {list(CLUSTERS)}")
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise RuntimeError(
            "the SLURM backend needs sbatch, which is not on PATH here; run the sweep on a SLURM login node "
            "or use the local backend"
        )

    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    parameters = {
        "name": name,
        "timeout_min": settings.time_min,
        "gpus_per_node": settings.gpus_per_task,
        "cpus_per_task": settings.cpus_per_task,
        "mem_gb": settings.mem_gb,
        "slurm_array_parallelism": settings.array_parallelism,
        "slurm_partition": settings.partition,
        "slurm_account": settings.account,
    }
    executor.update_parameters(**{key: value for key, value in parameters.items() if value is not None})
    logger.info("submitit executor for cluster %r in %s with %s", cluster, folder, settings)
    return executor


def submit_jobs(executor, specs: Sequence[JobSpec]) -> list:
    """Submit one job per spec, as a job array where the cluster supports arrays."""
    jobs = executor.map_array(run_command_job, list(specs))
    logger.info("submitted %d jobs: %s", len(jobs), ", ".join(str(job.job_id) for job in jobs[:5]))
    return jobs


def wait_for_jobs(jobs: Sequence, cluster: str) -> Iterator[tuple[int, int | None, str | None]]:
    """Yield (index, exit code, error) for each job as it ends.

    The exit code is None when the job itself failed (timed out, killed, cancelled),
    and the error then gives the reason.
    """
    from submitit.core.utils import FailedJobError, UncompletedJobError
    from submitit.helpers import as_completed

    index_of = {id(job): index for index, job in enumerate(jobs)}
    # A DebugExecutor job runs only when its result is requested, so it is never "done" before.
    ended = iter(jobs) if cluster == "debug" else as_completed(list(jobs), poll_frequency=POLL_SECONDS[cluster])
    for job in ended:
        try:
            exit_code = job.result()
        except (FailedJobError, UncompletedJobError, OSError) as e:
            logger.error("job %s failed: %s", job.job_id, e)
            yield index_of[id(job)], None, f"{type(e).__name__}: {e}"
            continue
        yield index_of[id(job)], int(exit_code), None


def cancel_jobs(jobs: Sequence) -> None:
    """Cancel jobs that have not ended, for a sweep that stops at its first failure."""
    for job in jobs:
        if not job.done():
            job.cancel(check=False)
