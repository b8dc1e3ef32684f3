"""The distributed executor: one Ray task per output shard (``--ray [ADDRESS]``, ``executor="ray"``).

The driver plans and finishes; each Ray task gets one :class:`~streamfold.tasks.Task` as JSON, reads
its source files from the path the driver planned (shared storage: every node must see the source
and the staging folder at the same paths) and writes its shard into the staging folder under a
temporary name, renamed when complete, so a killed attempt never leaves a file that looks done. Ray
retries tasks whose worker died (``max_retries``) and tasks that failed with an ``OSError`` (flaky
shared storage); bad input (a changed source) fails at once. A task asks for ``num_cpus`` = its
engine's threads (``--workers``, default 2: one folds, one writes) and ``memory`` = its buffer budget
plus the worker's own footprint.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import StreamfoldError
from .tasks import DEFAULT_BUDGET

MAX_RETRIES = 3
WORKER_OVERHEAD = 256 << 20  # a Python worker with numpy, before any buffer
DEFAULT_TASK_WORKERS = 2
# Tests only: a folder; a file "arm" in it makes the next task attempt that finds it die mid-way.
CRASH_DIR_ENV = "STREAMFOLD_TEST_RAY_CRASH_DIR"


def require_ray():
    """The ``ray`` module, or a one-line error naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise StreamfoldError('--ray needs Ray, which is not installed: pip install "streamfold[ray]"') from None
    return ray


def _crash_hook():
    """A progress callback that kills this worker process once, after its first write (tests)."""
    folder = os.environ.get(CRASH_DIR_ENV)
    if not folder:
        return None
    arm = Path(folder) / "arm"
    try:
        os.rename(arm, Path(folder) / f"fired-{os.getpid()}")  # atomic: exactly one attempt takes it
    except OSError:
        return None

    def tick(_n: int) -> None:
        os._exit(17)
    return tick


def _run_one(task_json: str, src: str, out_dir: str, workers: int, memory_budget: int,
             hash_output: bool) -> tuple[str, int, str | None]:
    from .conversion import run_task
    from .tasks import Task
    r = run_task(Task.from_json(task_json), out_dir, src=src, workers=workers, memory_budget=memory_budget,
                 hash_output=hash_output, progress=_crash_hook())
    return r.shard, r.size, r.sha256


def run_on_ray(tasks, src: Path, out_dir: Path, *, address: str | None = None, workers: int | None = None,
               memory_budget: int | None = None, hash_outputs: bool = False, on_done=None,
               max_retries: int = MAX_RETRIES) -> dict[str, str]:
    """Run ``tasks`` as Ray tasks writing into ``out_dir``; returns shard sha256s when hashed.

    Uses the running Ray session if there is one; otherwise joins ``address`` (or starts a local
    cluster when None) and disconnects at the end."""
    ray = require_ray()
    started = False
    if not ray.is_initialized():
        try:
            ray.init(address=address or None, include_dashboard=False, logging_level="ERROR",
                     configure_logging=True)
        except Exception as e:  # a bad address, a cluster that is not up
            raise StreamfoldError(f"--ray {address or ''}: cannot connect to or start a Ray cluster "
                                  f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
                                  ) from None
        started = True
    workers = workers or DEFAULT_TASK_WORKERS
    budget = memory_budget or DEFAULT_BUDGET
    fn = ray.remote(_run_one).options(num_cpus=workers, memory=budget + WORKER_OVERHEAD, max_retries=max_retries,
                                      retry_exceptions=[OSError], name="streamfold-shard")
    digests: dict[str, str] = {}
    try:
        refs = {fn.remote(t.to_json(), str(Path(src).resolve()), str(Path(out_dir).resolve()), workers, budget,
                          hash_outputs): t.shard for t in tasks}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                try:
                    shard, size, digest = ray.get(ref)
                except Exception as e:
                    raise _task_error(e, refs[ref], max_retries) from None
                if digest is not None:
                    digests[shard] = digest
                if on_done is not None:
                    on_done(shard, size, digest)
    except BaseException:
        for ref in refs if "refs" in locals() else ():
            try:
                ray.cancel(ref, force=True)
            except Exception:  # already finished
                pass
        raise
    finally:
        if started:
            ray.shutdown()
    return digests


def _task_error(e: BaseException, shard: str, retries: int) -> StreamfoldError:
    cause = getattr(e, "cause", None)
    if isinstance(cause, StreamfoldError):
        return StreamfoldError(str(cause))
    first = (str(cause or e).strip().splitlines() or [type(e).__name__])[0]
    return StreamfoldError(f"{shard}: Ray task failed (retried up to {retries} times): {type(cause or e).__name__}: "
                           f"{first}")
