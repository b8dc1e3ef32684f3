"""Plan a very large checkpoint and, optionally, run one of its tasks: time and peak memory.

    python benchmarks/make_synthetic.py llama-405b $DATA/l405 --sparse     # 811 GB apparent, ~10 MB on disk
    python benchmarks/plan_big.py $DATA/l405 [--run-task N --out DIR]

Each step runs in a fresh process (``ru_maxrss`` of that process is its peak RSS):

* ``plan``: ``streamfold.plan(SRC)`` (headers and norm vectors only), then every task serialised to
  JSON and parsed back; prints the planning time, the peak RSS, the task count and JSON sizes. This is
  the driver's share of a Ray fan-out or a Hub stream: what a laptop has to hold.
* ``--run-task N``: ``streamfold.run_task`` of task N (default: the largest) into ``--out``, from the
  task's JSON alone; prints its time and peak RSS (one worker's share). With a ``--sparse`` source the
  weights are zeros and the output shard is real data on disk (delete it after).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child_plan(src: str, tasks_out: str) -> dict:
    import streamfold
    from streamfold.planning.tasks import Task
    t0 = time.perf_counter()
    p = streamfold.plan(src)
    t_plan = time.perf_counter() - t0
    rss_plan = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    texts = [t.to_json() for t in p.tasks]
    back = [Task.from_json(s) for s in texts]
    t_json = time.perf_counter() - t0 - t_plan
    assert [t.to_json() for t in back] == texts, "task JSON does not round-trip"
    os.makedirs(tasks_out, exist_ok=True)
    for i, text in enumerate(texts):  # one file a task, as a scheduler would ship them
        with open(os.path.join(tasks_out, f"{i}.json"), "w") as f:
            f.write(text)
    with open(os.path.join(tasks_out, "sizes.json"), "w") as f:
        json.dump([t.file_bytes for t in back], f)
    sizes = sorted(len(s.encode()) for s in texts)
    return {"step": "plan", "seconds": round(t_plan, 2), "json_seconds": round(t_json, 2),
            "tasks": len(back), "tensors": sum(len(t.tensors) for t in back),
            "chunks": sum(len(t.chunks) for t in back), "output_gb": round(sum(t.file_bytes for t in back) / 1e9, 1),
            "task_json_bytes_total": sum(sizes), "task_json_bytes_max": sizes[-1],
            "task_json_bytes_median": sizes[len(sizes) // 2],
            "peak_rss_mib_plan": rss_plan,
            "peak_rss_mib_with_json": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def _child_run(src: str, tasks_dir: str, index: int, out: str) -> dict:
    import streamfold
    from streamfold.planning.tasks import Task
    if index < 0:  # the largest output shard
        sizes = json.load(open(os.path.join(tasks_dir, "sizes.json")))
        index = max(range(len(sizes)), key=sizes.__getitem__)
    with open(os.path.join(tasks_dir, f"{index}.json")) as f:
        task = Task.from_json(f.read())  # this task's JSON only, as a worker receives it
    t0 = time.perf_counter()
    r = streamfold.run_task(task, out, src=src)
    os.sync()
    dt = time.perf_counter() - t0
    return {"step": "run_task", "task": index, "shard": r.shard, "bytes": r.size, "seconds": round(dt, 2),
            "gb_per_s": round(r.size / dt / 1e9, 2),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def _spawn(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"step {args[0]} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("--run-task", type=int, nargs="?", const=-1, default=None,
                    help="also run task N (default: the largest shard) from its JSON")
    ap.add_argument("--out", help="folder for --run-task's shard (default: a temporary one, removed)")
    ap.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._child:
        step, *rest = a._child
        print(json.dumps(_child_plan(a.src, *rest) if step == "plan" else
                         _child_run(a.src, rest[0], int(rest[1]), rest[2])))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        tasks = os.path.join(tmp, "tasks")
        print(json.dumps(_spawn(a.src, "--_child", "plan", tasks)))
        if a.run_task is not None:
            out = a.out or os.path.join(tmp, "out")
            os.makedirs(out, exist_ok=True)
            print(json.dumps(_spawn(a.src, "--_child", "run", tasks, str(a.run_task), out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
