"""Task runners and Prefect settings Kiln applies before Prefect is imported."""

from __future__ import annotations

import os

from flows.config import RuntimeConfig


def prefect_defaults() -> None:
    """Settings for the embedded default; anything the user set in the environment wins."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_API_HOST", "127.0.0.1")


def task_runner(runtime: RuntimeConfig):
    if runtime.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if runtime.dask_address:
            return DaskTaskRunner(address=runtime.dask_address)
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": runtime.workers,
                "threads_per_worker": 1,
                "processes": True,
                "host": "127.0.0.1",
                "dashboard_address": None,
            }
        )
    if runtime.task_runner == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as e:
            raise RuntimeError("runtime.task_runner: ray needs prefect-ray: pip install 'kiln[ray]'") from e
        if runtime.ray_address:
            return RayTaskRunner(address=runtime.ray_address)
        return RayTaskRunner(init_kwargs={"num_cpus": runtime.workers, "include_dashboard": False})
    if runtime.task_runner == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=runtime.workers, initializer=_one_thread_per_worker)
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=runtime.workers)


def _one_thread_per_worker() -> None:
    """A process-pool worker owns one core: BLAS / OpenMP pools of their own would fight over it."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
