"""Time Hub-to-Hub conversion against a local Hub: ``--stream`` against download + convert + upload.

    python benchmarks/bench_hub.py SRC [--runs 2] [--paths stream,plain,fetch] [--work-dir DIR]
                                   [--interval 0.2] [--json-out FILE] [-- STREAMFOLD ARGS...]

SRC is a local checkpoint folder (e.g. from make_synthetic.py). The script starts the local Hub of
the tests (``tests/hubserver.py``, real HTTP, in a thread of this process) with
``HubServer(sink=True)``: SRC becomes the repo ``bench/src``, served from SRC's own files (sendfile;
nothing is copied), and uploads are checked (sha256 and size of every LFS object) and then dropped,
so the benchmark needs no disk for the pushed copy. Each operation is a child process pointed at
the server with ``HF_ENDPOINT`` (fresh ``HF_HOME`` under the work dir, ``HF_HUB_DISABLE_XET=1``: the
server speaks LFS basic transfer, not Xet), timed from spawn to exit plus a ``sync``:

* ``stream`` - ``python -m streamfold bench/src DST --push-to-hub bench/dst-stream-N --stream --json``
* ``plain``  - ``python -m streamfold bench/src DST --push-to-hub bench/dst-plain-N --json``
               (download every file into the HF cache, convert into DST, upload DST, one commit)
* ``fetch``  - ``huggingface_hub.snapshot_download('bench/src')`` into the HF cache: the HTTP cost of
               getting the source alone, without conversion or upload

Each run does every path, the order alternating between runs (forward, reversed, ...); before each
operation the outputs of the previous one are deleted and ``sync``ed, and SRC is read once so the
server serves it from the page cache (warm). Per operation:

* wall time; peak RSS and CPU seconds of the child (GNU ``/usr/bin/time``); CPU seconds of this
  process meanwhile (the server thread: sendfile, and sha256 of every uploaded byte)
* peak local disk beyond the source, two ways: a thread walks the work dir (HF cache, DST, staging and
  streaming folders beside DST) every ``--interval`` seconds and sums allocated blocks (``lstat``
  ``st_blocks``, so sparse header stubs count as what they occupy); and the growth of the whole
  file system's used space (``statvfs``) over its value at the start of the operation, which also
  sees other processes' files. For ``stream`` the figure streamfold reports (``peak_disk`` in its
  ``--json`` report: its own work folder, sampled after each shard's download and after its conversion)
  is listed too.
* bytes the server served (downloads, full and ranged) and received (LFS uploads), from its counters
* the pushed commit: sha256 and size of each file, compared between all ``stream`` and ``plain`` runs

A markdown table goes to stdout, then one JSON document (``--json-out`` writes it to a file too).
Everything under the work dir is deleted after each operation, and on exit or failure.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]
from bench import GNU_TIME, dir_bytes, prewarm, source_digest, split_argv, use_gnu_time  # noqa: E402
from tests.hubserver import HubServer  # noqa: E402  (test code; fine for a benchmark)

SOURCE_REPO = "bench/src"
FETCH = "import sys; from huggingface_hub import snapshot_download; snapshot_download(sys.argv[1])"


def allocated(path: str) -> int:
    """Bytes allocated under ``path`` (lstat: symlinks of the HF cache count once, as links)."""
    total = 0
    for root, dirs, files in os.walk(path):
        for f in dirs + files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def fs_used(path: str) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


class DiskPoller(threading.Thread):
    """Peak of ``allocated(folder)`` and of the file system's used-space growth, every ``interval`` s."""

    def __init__(self, folder: str, interval: float):
        super().__init__(daemon=True)
        self.folder, self.interval = folder, interval
        self.base = fs_used(folder)
        self.peak_walk = self.peak_fs = 0
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        while True:
            self.peak_walk = max(self.peak_walk, allocated(self.folder))
            self.peak_fs = max(self.peak_fs, fs_used(self.folder) - self.base)
            self.samples += 1
            if self._done.wait(self.interval):
                return

    def stop(self) -> None:
        self._done.set()
        self.join()
        self.peak_walk = max(self.peak_walk, allocated(self.folder))  # one last look


def child_env(server: HubServer, hf_home: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HUGGING_FACE_HUB_TOKEN", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_HUB_ETAG_TIMEOUT")}
    env.update(HF_ENDPOINT=server.url, HF_HOME=hf_home, HF_HUB_CACHE=os.path.join(hf_home, "hub"),
               HF_XET_CACHE=os.path.join(hf_home, "xet"), HF_TOKEN=server.token, HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_OFFLINE="0",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def run_op(argv: list[str], env: dict, work: str, interval: float, timed: bool) -> dict:
    """Run ``argv`` (+ sync) under GNU time with a disk poller on ``work``."""
    out_f, err_f, rss_f = (os.path.join(work, n) for n in (".stdout", ".stderr", ".rss"))
    cmd = [GNU_TIME, "-f", "%M %U %S", "-o", rss_f, *argv] if timed else argv
    poller = DiskPoller(work, interval)
    own0 = resource.getrusage(resource.RUSAGE_SELF)
    load0 = os.getloadavg()
    poller.start()
    t0 = time.perf_counter()
    with open(out_f, "wb") as so, open(err_f, "wb") as se:
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=so, stderr=se)
    os.sync()
    wall = time.perf_counter() - t0
    poller.stop()
    own1 = resource.getrusage(resource.RUSAGE_SELF)
    r = {"wall_s": round(wall, 3), "rc": rc, "peak_disk_walk": poller.peak_walk, "peak_disk_fs": poller.peak_fs,
         "disk_samples": poller.samples,
         "bench_process_cpu_s": round(own1.ru_utime + own1.ru_stime - own0.ru_utime - own0.ru_stime, 2),
         "load_start": [round(x, 2) for x in load0], "load_end": [round(x, 2) for x in os.getloadavg()]}
    try:
        m, u, s_ = open(rss_f).read().strip().splitlines()[-1].split()
        r["maxrss_mib"], r["cpu_s"] = round(int(m) / 1024, 1), round(float(u) + float(s_), 2)
    except (OSError, ValueError, IndexError):
        r["maxrss_mib"], r["cpu_s"] = None, None
    stdout, stderr = open(out_f, "rb").read().decode(errors="replace"), open(err_f, "rb").read()
    try:
        r["report"] = json.loads(stdout)
    except ValueError:
        r["report"] = None
    if rc != 0:
        r["stderr_tail"] = stderr[-3000:].decode(errors="replace")
    for f in (out_f, err_f, rss_f):
        if os.path.exists(f):
            os.remove(f)
    return r


def clear(work: str) -> None:
    for name in os.listdir(work):
        p = os.path.join(work, name)
        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
    os.sync()


def pushed_files(server: HubServer, repo_id: str) -> dict[str, list]:
    repo = server.repos.get(repo_id)
    if repo is None:
        return {}
    head = repo.resolve("main")
    return {p: [b.sha256, b.size] for p, b in sorted(head.files.items()) if p != ".gitattributes"}


def main(argv=None) -> int:
    original, argv, passthrough = split_argv(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="local checkpoint folder, served as the Hub repo bench/src")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--paths", default="stream,plain,fetch", help="comma-separated: stream, plain, fetch")
    ap.add_argument("--work-dir", default=None, help="HF_HOME and DST of each operation (default: beside SRC)")
    ap.add_argument("--interval", type=float, default=0.2, help="disk poll interval, seconds")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not paths or set(paths) - {"stream", "plain", "fetch"}:
        ap.error("--paths takes stream, plain and/or fetch")
    if not use_gnu_time():
        ap.error(f"needs GNU time at {GNU_TIME} (peak RSS of the child)")
    src = os.path.abspath(args.src)
    if not os.path.isdir(src):
        ap.error(f"{src} is not a directory")
    src_bytes = dir_bytes(src)
    work = os.path.abspath(args.work_dir or os.path.join(os.path.dirname(src), "_bench_hub"))
    os.makedirs(work, exist_ok=True)
    if os.listdir(work):
        ap.error(f"{work} is not empty (everything in it is deleted between operations)")
    need = {"stream": 0.7 * src_bytes, "plain": 2.05 * src_bytes, "fetch": 1.02 * src_bytes}

    server = HubServer(sink=True).start()
    results: dict[str, list[dict]] = {p: [] for p in paths}
    digest = source_digest(os.path.join(REPO, "streamfold"))
    try:
        t0 = time.perf_counter()
        server.add_repo(SOURCE_REPO, src)  # hashes every file once (sha256 for the LFS metadata)
        add_s = time.perf_counter() - t0
        print(f"serving {src} ({src_bytes / 1e9:.2f} GB) as {SOURCE_REPO} at {server.url} "
              f"(hashed in {add_s:.1f} s)", file=sys.stderr)
        for run in range(args.runs):
            for name in (paths if run % 2 == 0 else list(reversed(paths))):
                free = shutil.disk_usage(work).free
                if free < need[name] + 2e9:
                    raise SystemExit(f"bench_hub: {name}: {free / 1e9:.1f} GB free in {work}, needs about "
                                     f"{(need[name] + 2e9) / 1e9:.1f} GB; stopping")
                hf_home, dst = os.path.join(work, "hf-home"), os.path.join(work, "dst")
                target = f"bench/dst-{name}-{run}"
                if name == "fetch":
                    cmd = [args.python, "-c", FETCH, SOURCE_REPO]
                else:
                    cmd = [args.python, "-m", "streamfold", SOURCE_REPO, dst, "--push-to-hub", target, "--json",
                           *(["--stream"] if name == "stream" else []), *passthrough]
                os.sync()
                prewarm(src)
                traffic0 = dict(server.traffic)
                r = run_op(cmd, child_env(server, hf_home), work, args.interval, timed=True)
                r.update(run=run, command=shlex.join(cmd),
                         served=server.traffic["served"] - traffic0["served"],
                         uploaded=server.traffic["uploaded"] - traffic0["uploaded"])
                rep = r.pop("report") or {}
                r["streamfold_peak_disk"] = rep.get("peak_disk")
                r["streamfold_seconds"] = rep.get("seconds")
                if name != "fetch":
                    r["pushed"] = pushed_files(server, target)
                    card = server.repos[target].resolve("main").files.get("README.md")
                    r["card"] = card.read().decode(errors="replace") if card is not None and card.data else None
                    server.repos.pop(target, None)
                results[name].append(r)
                gb = lambda n: f"{n / 1e9:.2f}" if n is not None else "n/a"  # noqa: E731
                print(f"[run {run}] {name:6s} {r['wall_s']:8.2f} s  rc {r['rc']}  cpu {r['cpu_s']} s  "
                      f"RSS {r['maxrss_mib']} MiB  disk walk {gb(r['peak_disk_walk'])} GB  fs "
                      f"{gb(r['peak_disk_fs'])} GB  streamfold {gb(r['streamfold_peak_disk'])} GB  served "
                      f"{gb(r['served'])} GB  uploaded {gb(r['uploaded'])} GB  server cpu "
                      f"{r['bench_process_cpu_s']} s  load {r['load_start'][0]}->{r['load_end'][0]}",
                      file=sys.stderr)
                if r["rc"] != 0:
                    print(r.get("stderr_tail", ""), file=sys.stderr)
                clear(work)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    pushes = [(n, r["run"], r["pushed"]) for n in ("stream", "plain") for r in results.get(n, []) if r["rc"] == 0]
    same, differ = None, []
    if len(pushes) > 1:  # which files are not the same (sha256, size) in every stream/plain push
        names = sorted(set().union(*(p.keys() for _, _, p in pushes)))
        differ = [f for f in names if len({json.dumps(p.get(f)) for _, _, p in pushes}) > 1]
        same = not differ
    cards = [r.get("card") for n in ("stream", "plain") for r in results.get(n, [])[:1]]
    card_diff = None
    if len(cards) == 2 and None not in cards and cards[0] != cards[1]:  # what differs in the model cards
        import difflib
        card_diff = [d for d in difflib.unified_diff(cards[0].splitlines(), cards[1].splitlines(), "stream",
                                                      "plain", lineterm="", n=0)]
    summary = {}
    for name, rs in results.items():
        good = [r for r in rs if r["rc"] == 0]
        med = statistics.median([r["wall_s"] for r in good]) if good else None
        summary[name] = {"runs_ok": len(good), "runs": len(rs), "wall_s": [r["wall_s"] for r in rs],
                         "median_s": med, "peak_disk_walk_max": max((r["peak_disk_walk"] for r in good), default=None),
                         "peak_disk_fs_max": max((r["peak_disk_fs"] for r in good), default=None),
                         "streamfold_peak_disk_max": max((r["streamfold_peak_disk"] or 0 for r in good), default=None),
                         "maxrss_mib_max": max((r["maxrss_mib"] or 0 for r in good), default=None),
                         "cpu_s_median": statistics.median([r["cpu_s"] for r in good]) if good else None,
                         "server_cpu_s_median": statistics.median([r["bench_process_cpu_s"] for r in good])
                         if good else None,
                         "served": good[-1]["served"] if good else None,
                         "uploaded": good[-1]["uploaded"] if good else None}
    base = summary.get("plain", {}).get("median_s")
    doc = {"src": src, "src_bytes": src_bytes, "runs": args.runs, "paths": paths, "streamfold_args": passthrough,
           "command": "python benchmarks/bench_hub.py " + shlex.join(original),
           "streamfold_source_sha256_16": digest, "source_hash_seconds": round(add_s, 1),
           "pushed_commits_identical": same,
           "pushed_files_differing": differ, "card_diff_stream_vs_plain": card_diff, "summary": summary, "per_run": results}
    print("| path | runs ok | wall s (each run) | x plain | peak disk GB (walk / fs / streamfold) | peak RSS MiB "
          "| CPU s | server CPU s | served GB | uploaded GB | load 1m |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    f2 = lambda v: f"{v / 1e9:.2f}" if v else "-"  # noqa: E731
    for name, s in summary.items():
        rs = results[name]
        ratio = f"{s['median_s'] / base:.2f}" if base and s["median_s"] else "-"
        loads = ", ".join(f"{r['load_start'][0]:.1f}" for r in rs)
        print(f"| {name} | {s['runs_ok']}/{s['runs']} | {', '.join(f'{w:.1f}' for w in s['wall_s'])} | {ratio} | "
              f"{f2(s['peak_disk_walk_max'])} / {f2(s['peak_disk_fs_max'])} / {f2(s['streamfold_peak_disk_max'])} | "
              f"{s['maxrss_mib_max']} | {s['cpu_s_median']} | {s['server_cpu_s_median']} | {f2(s['served'])} | "
              f"{f2(s['uploaded'])} | {loads} |")
    if same is not None:
        print(f"\npushed commits (sha256 and size of every file) identical across stream/plain runs: {same}"
              + (f" (differing: {', '.join(differ)})" if differ else ""))
        if card_diff:
            print("README.md, first stream run vs first plain run:\n" + "\n".join(card_diff[2:]))
    js = json.dumps(doc, indent=2)
    print(js)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(js + "\n")
    return 0 if all(s["runs_ok"] == s["runs"] for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
