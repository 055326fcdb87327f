"""Where the runs of a sweep execute. `suites.run` plans the configs; a launcher runs each of them through
`suites.launch.runs.run_config` (lock, skip when another sweep finished it, one record per run in --out) and
yields each config with its outcome as it finishes, in any order:

  Sequential        one run after another on this machine (the default)
  Parallel(K)       K runs at once on this machine; on GPUs each run gets its own devices
                    (CUDA_VISIBLE_DEVICES: world_size devices per run, K·world_size must be visible)
  Submitit(...)     one Slurm job per run through submitit (`--launcher slurm`), or submitit's local executor
                    (`--launcher submitit-local`: the same job code as on a cluster, run on this machine)

Records land in the same --out whatever the launcher, so a sweep resumes the same way: runs with an `ok`
record are not planned again, and the per-run lock keeps two launchers from running one config twice. A job
that dies before its run writes a record (a Slurm time limit, a node failure) gets an `error` record naming
the job.
"""

from __future__ import annotations

import os
import queue
import sys
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

LAUNCHERS = ("local", "slurm", "submitit-local")


class Sequential:
    def run(self, configs: list[dict], out: Path) -> Iterator[tuple[dict, str]]:
        from suites.launch.runs import run_config

        for cfg in configs:
            yield cfg, run_config(cfg, out)


class Parallel:
    """K runs at a time. `devices`: the visible CUDA devices (None on CPU); each run takes world_size of
    them for its lifetime, so runs never share a GPU."""

    def __init__(self, k: int, devices: list[str] | None):
        self.k, self.devices = k, devices

    def run(self, configs: list[dict], out: Path) -> Iterator[tuple[dict, str]]:
        from suites.launch.runs import run_config

        slots: queue.Queue = queue.Queue()
        if self.devices is None:
            for _ in range(self.k):
                slots.put(None)
        else:
            per_run = max(cfg["world_size"] for cfg in configs) if configs else 1
            for i in range(self.k):
                slots.put(",".join(self.devices[i * per_run:(i + 1) * per_run]))

        def one(cfg: dict) -> str:
            slot = slots.get()
            try:
                env = {"OASIS_NO_PROGRESS": "1"}  # K runs' bars would draw over each other; the sweep's stays
                if slot is not None:
                    env["CUDA_VISIBLE_DEVICES"] = slot
                return run_config(cfg, out, env=env)
            finally:
                slots.put(slot)

        pool = ThreadPoolExecutor(max_workers=self.k)
        pending = {pool.submit(one, cfg): cfg for cfg in configs}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield pending.pop(future), future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def run_job(cfg: dict, out: str) -> str:
    """The body of one submitit job: the run under its lock, exactly as on this machine."""
    from suites.launch.runs import run_config

    return run_config(cfg, Path(out))


class Submitit:
    """One submitit job per run. `cluster`: "slurm" or "local" (submitit's LocalExecutor). Job logs and
    pickles live in `folder`; each job asks for world_size GPUs on one node (none on the CPU) and
    `timeout_min`; `partition` is Slurm's."""

    def __init__(self, cluster: str, folder: Path, *, timeout_min: int, partition: str | None = None,
                 gpus: bool = False, cpus_per_task: int | None = None):
        self.cluster, self.folder = cluster, folder
        self.timeout_min, self.partition, self.gpus, self.cpus = timeout_min, partition, gpus, cpus_per_task

    def executor(self, world_size: int):
        import submitit

        executor = submitit.AutoExecutor(folder=self.folder / "%j", cluster=self.cluster)
        params: dict = {"timeout_min": self.timeout_min, "nodes": 1, "tasks_per_node": 1,
                        "name": "oasis-bench"}
        if self.gpus:
            params["gpus_per_node"] = world_size
        if self.cpus:
            params["cpus_per_task"] = self.cpus
        if self.partition and self.cluster == "slurm":
            params["slurm_partition"] = self.partition
        executor.update_parameters(**params)
        return executor

    def run(self, configs: list[dict], out: Path) -> Iterator[tuple[dict, str]]:
        import submitit

        from suites.core import records
        from suites.launch.runs import failure_record

        if not configs:
            return
        jobs = []
        for cfg in configs:
            job = self.executor(cfg["world_size"]).submit(run_job, cfg, str(out))
            jobs.append((job, cfg))
        print(f"submitted {len(jobs)} {self.cluster} jobs (logs: {self.folder}/<job id>/); waiting for them",
              file=sys.stderr)
        by_job = {id(job): cfg for job, cfg in jobs}
        try:
            for job in submitit.helpers.as_completed([job for job, _ in jobs]):
                cfg = by_job[id(job)]
                try:
                    outcome = job.result()
                except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as exc:
                    # the job died (time limit, node failure, a crash outside the run): its run is a result
                    text = str(exc).strip()
                    first = text.splitlines()[-1][:300] if text else type(exc).__name__
                    if not records.has_ok_record(out, cfg):
                        records.write_record(failure_record(cfg, f"{self.cluster} job {job.job_id} failed: "
                                                                 f"{first}"), out)
                    outcome = "ran"
                yield cfg, outcome
        except KeyboardInterrupt:
            if self.cluster == "slurm":
                print("the submitted jobs keep running on the cluster; run the same command again to collect "
                      "their records (finished runs are skipped)", file=sys.stderr)
            raise


def visible_devices() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES names them (or their indices)."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given:
        return [d.strip() for d in given.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]
