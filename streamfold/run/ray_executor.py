"""The distributed executor: one Ray task per output shard (``--ray [ADDRESS]``, ``executor="ray"``).

The driver plans and finishes; each Ray task gets one :class:`~streamfold.planning.tasks.Task` as JSON, reads
its source files from the path the driver planned (shared storage: every node must see the source
and the staging folder at the same paths) and writes its shard into the staging folder under a
temporary name, renamed when complete, so a killed attempt never leaves a file that looks done. Ray
retries tasks whose worker died (``max_retries``) and tasks that failed with an ``OSError`` (flaky
shared storage); bad input (a changed source) fails at once. A task asks for ``num_cpus`` = its
engine's threads (``--workers``, default 2: one folds, one writes) and ``memory`` = its buffer budget
plus the worker's own footprint.

From a Hub repo id the driver downloads no weights (it plans from remote headers, see
:mod:`streamfold.hub.remote`): each task downloads only its own source shard(s), pinned to the
planned commit and endpoint, into ``streamfold-<run>-<shard>`` in its worker's temporary directory
(``TMPDIR``; not into the Hugging Face cache, which would grow to the whole model on every node;
huggingface_hub copies a file from the worker's cache when it is already there), and
removes it when its shard is written; a retried attempt on the same node first removes what a killed
one fetched. The worker's own ``HF_TOKEN`` (or login) authenticates, unless a token was passed
explicitly. With ``--push-to-hub --stream`` the task also pre-uploads its shard and returns the commit
operation (:mod:`streamfold.run.hub_task`): nothing reaches shared storage at all.
"""
from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

from ..core.errors import StreamfoldError
from ..planning.tasks import DEFAULT_BUDGET

MAX_RETRIES = 3
WORKER_OVERHEAD = 256 << 20  # a Python worker with numpy, before any buffer
DEFAULT_TASK_WORKERS = 2


def require_ray():
    """The ``ray`` module, or a one-line error naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise StreamfoldError('--ray needs Ray, which is not installed: pip install "streamfold[ray]"') from None
    return ray


def _run_one(task_json: str, src: str | None, out_dir: str | None, workers: int, memory_budget: int,
             hash_output: bool, hub: dict | None = None, run_id: str = "", verify: bool = False,
             push_to_hub: str | None = None) -> dict:
    """One task on a Ray worker: from shared storage (``src``), or from the Hub (``hub``: a HubRef)."""
    from .conversion import run_task
    from ..planning.tasks import Task
    task = Task.from_json(task_json)
    if hub is None:
        r = run_task(task, out_dir, src=src, workers=workers, memory_budget=memory_budget, hash_output=hash_output)
        return {"shard": r.shard, "size": r.size, "sha256": r.sha256, "op": None, "peak_disk": None,
                "dequant": r.dequant}
    from ..hub.client import _quiet_bars
    from ..hub.remote import HubRef
    from .hub_task import run_hub_task
    # a fixed name per run and shard: a retried attempt on the same node removes what a killed one fetched
    work = Path(tempfile.gettempdir()) / f"streamfold-{run_id}-{task.shard}"
    with _quiet_bars(True):  # no download / upload bars in the worker logs Ray forwards to the driver
        return run_hub_task(task, HubRef(**hub), work, Path(out_dir) if out_dir else None, workers=workers,
                            memory_budget=memory_budget, hash_output=hash_output, verify=verify,
                            push_to_hub=push_to_hub, push_token=hub.get("token"))


def run_on_ray(tasks, src: Path | None, out_dir: Path | None, *, address: str | None = None,
               workers: int | None = None, memory_budget: int | None = None, hash_outputs: bool = False,
               on_done=None, max_retries: int = MAX_RETRIES, hub=None, verify: bool = False,
               push_to_hub: str | None = None) -> dict[str, dict]:
    """Run ``tasks`` as Ray tasks writing into ``out_dir``; returns ``{shard: {"shard", "size", "sha256",
    "op", "peak_disk", "dequant"}}`` (``on_done(shard, size, sha256, dequant)`` as each completes).

    The sources are the folder ``src`` on shared storage, or, with ``hub`` (a
    :class:`~streamfold.hub.remote.HubRef`), each task downloads its own source shards from the Hub into
    its worker's temporary directory and deletes them when its shard is written (``verify``: checked
    there against them first). With ``push_to_hub`` each task pre-uploads its shard (``out_dir`` None:
    written in the worker's temporary directory) and returns the commit operation in ``"op"``.

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
    results: dict[str, dict] = {}
    hub_ref, run_id = (hub.to_dict() if hub is not None else None), uuid.uuid4().hex[:12]
    src_arg = str(Path(src).resolve()) if src is not None else None
    out_arg = str(Path(out_dir).resolve()) if out_dir is not None else None
    pending: list = []
    try:
        refs = {fn.remote(t.to_json(), src_arg, out_arg, workers, budget, hash_outputs, hub_ref, run_id, verify,
                          push_to_hub): t.shard for t in tasks}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                try:
                    r = ray.get(ref)
                except Exception as e:
                    raise _task_error(e, refs[ref], max_retries) from None
                results[r["shard"]] = r
                if on_done is not None:
                    on_done(r["shard"], r["size"], r["sha256"], r.get("dequant"))
    except StreamfoldError:
        # A task failed: let the others finish (their results are dropped) instead of cancelling them.
        # Ray 2.60's driver aborts the whole process (RAY_CHECK "Tried to complete task that was not
        # pending", task_manager.cc) when a cancelled task completes at the same moment, seen in CI;
        # and a task left to finish removes what it fetched.
        if pending:
            ray.wait(pending, num_returns=len(pending))
        raise
    except BaseException:  # Ctrl-C, SIGTERM: stop now; a killed task's half shard never has its name
        for ref in refs if "refs" in locals() else ():
            try:
                ray.cancel(ref, force=True)
            except Exception:  # already finished
                pass
        raise
    finally:
        if started:
            ray.shutdown()
    return results


def _task_error(e: BaseException, shard: str, retries: int) -> StreamfoldError:
    cause = getattr(e, "cause", None)  # a RayTaskError: what the task raised
    if isinstance(cause, StreamfoldError):  # bad input, a failed check: the worker's own one line
        return cause
    err = cause or e
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    died = "" if cause is not None else f" (retried up to {retries} times)"  # the worker or its node died
    return StreamfoldError(f"{shard}: Ray task failed{died}: {type(err).__name__}: {first}")
