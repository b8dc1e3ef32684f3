"""Time streamfold against a plain copy of the same checkpoint (and optionally the reference).

    python benchmarks/bench.py SRC [--runs 3] [--cold] [--reference] [--no-streamfold] [--variant ARGS]
                               [--work-dir DIR] [--json-out FILE] [-- STREAMFOLD ARGS...]

Operations, each run as a child process and timed from spawn to exit (so the
converter's interpreter start-up and imports are included):

* ``copyfile``   - ``shutil.copyfile`` of every file of SRC into a fresh dir
                   (on Linux this uses sendfile/copy_file_range, like ``cp``).
* ``cp -r``      - ``cp -r SRC DST``.
* ``streamfold`` - ``python -m streamfold SRC DST [extra args]`` (any argument this
                   script does not know, or everything after ``--``, is passed on,
                   e.g. ``--workers 2 --memory-budget 256M --merged-dtype float32``).
* ``streamfold ARGS`` - with ``--variant ARGS`` (repeatable): the same plus ``ARGS``, e.g.
                   ``--variant=--manifest``, alternated with the others in every run.
* ``reference``  - with ``--reference``: transformer-tricks ``flashify_repo`` 0.4.1 via
                   ``benchmarks/reference_flashify.py`` in the separate benchmark venv.

Each run executes all operations, in alternating order (run 0: copy ops then
converters, run 1: reversed, ...).  Before every operation: output of the previous one
is deleted, ``sync`` (untimed), then either the source is read once so it sits in the
page cache (default, "warm") or, with ``--cold``, the page cache is dropped
(``echo 3 > /proc/sys/vm/drop_caches``, needs root; the script reports whether it
worked).  By default a ``sync`` after the child exits is inside the timed span, so
every operation is charged for getting its output to disk (``--no-sync`` to leave it
out).  Peak RSS of the child: measured by GNU ``/usr/bin/time -f %M`` when present
(the child is forked from ``time``, ~1 MB), else ``ru_maxrss`` from ``os.wait4``,
which on Linux never reads below this script's own RSS at spawn time (reported as
``rss_floor_kb``).

Reported per operation: median (and min) wall time over the runs, GB/s (source bytes / median
time, GB = 1e9 bytes), ratio to the ``copyfile`` median, median and max peak RSS;
and streamfold vs reference ratios when both ran.  A markdown table goes to stdout
followed by one JSON document; ``--json-out`` also writes the JSON to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_REF_PYTHON = os.path.join(REPO, ".bench-venv", "bin", "python")  # the venv of README section 2

COPY_SNIPPET = r"""
import os, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
for root, dirs, files in os.walk(src):
    rel = os.path.relpath(root, src)
    out = os.path.normpath(os.path.join(dst, rel))
    os.makedirs(out, exist_ok=True)
    for f in files:
        shutil.copyfile(os.path.join(root, f), os.path.join(out, f))
"""


# ------------------------------------------------------------------------- helpers

def dir_bytes(path: str, suffix: str = "") -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            if f.endswith(suffix):
                total += os.path.getsize(os.path.join(root, f))
    return total


def drop_caches() -> str | None:
    """Drop the page cache. Returns None on success, else the reason it failed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None


def mem_total_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def cached_kb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1])
    return -1


def prewarm(path: str) -> None:
    """Read every file once so it is in the page cache (64 MiB buffer, reused)."""
    buf = bytearray(4 << 20)
    mv = memoryview(buf)
    for root, _dirs, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb", buffering=0) as fh:
                while fh.readinto(mv):
                    pass


GNU_TIME = "/usr/bin/time"


def reset_own_hiwater() -> int:
    """Reset this process's peak RSS to its current RSS; return current RSS in KB.

    A child's ru_maxrss starts at its parent's peak RSS (fork copies the mm, and on
    exec Linux folds the old mm's high-water mark into the child's maxrss), so
    the parent's own peak is a floor under every reading taken with wait4.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5\n")
    except OSError:
        pass
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def use_gnu_time() -> bool:
    try:
        r = subprocess.run([GNU_TIME, "-f", "%M", "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and r.stderr.strip().isdigit()


def run_child(argv: list[str], cwd: str | None, env: dict | None, sync: bool,
              rss_file: str | None) -> dict:
    """Spawn argv and wait -> wall time, exit code, the child's peak RSS (KB).

    With rss_file, argv runs under GNU time (-f %M -o rss_file): the measured process
    is forked from `time` (~1 MB), so its peak RSS has no floor from this script.
    Otherwise the child's ru_maxrss comes from os.wait4 (floor: this script's RSS).
    """
    floor_kb = 0
    if rss_file:
        argv = [GNU_TIME, "-f", "%M %U %S", "-o", rss_file, *argv]
    else:
        floor_kb = reset_own_hiwater()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out, err = _communicate_then_wait4(proc)
    if sync:
        os.sync()
    wall = time.perf_counter() - t0
    maxrss, cpu = proc._bench_maxrss_kb, proc._bench_cpu_s
    if rss_file:
        try:
            with open(rss_file) as f:
                m, u, s_ = f.read().strip().splitlines()[-1].split()
            maxrss, cpu = int(m), float(u) + float(s_)
        except (OSError, ValueError, IndexError):
            maxrss, cpu = -1, -1.0
    return {"wall_s": wall, "rc": proc.returncode, "maxrss_kb": maxrss, "cpu_s": round(cpu, 2),
            "rss_floor_kb": floor_kb,
            "stdout_tail": out[-2000:].decode(errors="replace"),
            "stderr_tail": err[-2000:].decode(errors="replace")}


def _communicate_then_wait4(proc: subprocess.Popen) -> tuple[bytes, bytes]:
    import selectors

    sel = selectors.DefaultSelector()
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    for p in bufs:
        sel.register(p, selectors.EVENT_READ)
    while sel.get_map():
        for key, _ in sel.select():
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                key.fileobj.close()
            else:
                b = bufs[key.fileobj]
                b += chunk
                if len(b) > 1 << 20:  # keep only the tail
                    del b[:-(1 << 19)]
    _pid, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc._bench_maxrss_kb = ru.ru_maxrss  # KB on Linux
    proc._bench_cpu_s = ru.ru_utime + ru.ru_stime
    return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr])


def streamfold_available(python: str) -> tuple[bool, str]:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        r = subprocess.run([python, "-m", "streamfold", "--help"], cwd=REPO, env=env,
                           capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    msg = (r.stderr or r.stdout).decode(errors="replace").strip().splitlines()
    return r.returncode == 0, (msg[-1] if msg else "")


def source_digest(pkg_dir: str) -> str | None:
    """sha256 over streamfold/*.py (name + content): which code state was measured."""
    import hashlib

    if not os.path.isdir(pkg_dir):
        return None
    h = hashlib.sha256()
    for root, dirs, files in os.walk(pkg_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if f.endswith(".py"):
                p = os.path.join(root, f)
                h.update(os.path.relpath(p, pkg_dir).encode() + b"\0")
                with open(p, "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()[:16]


def median(xs):
    return statistics.median(xs) if xs else None


# --------------------------------------------------------------------------- main

def split_argv(argv=None) -> tuple[list[str], list[str], list[str]]:
    """(the whole command line, the benchmark's own arguments, those after ``--`` for streamfold)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        return list(argv), argv[:i], argv[i + 1:]
    return list(argv), argv, []


def main(argv=None) -> int:
    original_argv, argv, passthrough = split_argv(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="checkpoint directory (e.g. from make_synthetic.py)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each op")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed copyfile runs before measuring (default 1): the first "
                         "big write after deleting a large output was often slow here")
    ap.add_argument("--no-sync", action="store_true",
                    help="do not include a final sync in the timed span")
    ap.add_argument("--reference", action="store_true",
                    help="also run transformer-tricks flashify_repo (benchmark venv)")
    ap.add_argument("--reference-python", default=DEFAULT_REF_PYTHON)
    ap.add_argument("--force-reference", action="store_true",
                    help="run the reference even if the checkpoint looks too big for RAM")
    ap.add_argument("--no-streamfold", action="store_true")
    ap.add_argument("--variant", action="append", default=[], metavar="ARGS",
                    help="also time streamfold with these extra arguments (shell-split, after the common "
                         "ones), as its own operation in the same runs; repeatable: --variant=--manifest")
    ap.add_argument("--no-cp", action="store_true", help="skip the `cp -r` operation")
    ap.add_argument("--python", default=sys.executable, help="interpreter for streamfold")
    ap.add_argument("--work-dir", default=None,
                    help="where outputs go (default: next to SRC); each is deleted after use")
    ap.add_argument("--label", default=None, help="name for the table (default: SRC basename)")
    ap.add_argument("--json-out", default=None)
    args, unknown = ap.parse_known_args(argv)
    passthrough = unknown + passthrough

    src = os.path.abspath(args.src)
    if not os.path.isdir(src):
        ap.error(f"{src} is not a directory")
    label = args.label or os.path.basename(src.rstrip("/"))
    work = os.path.abspath(args.work_dir or os.path.join(os.path.dirname(src), "_bench_out"))
    os.makedirs(work, exist_ok=True)
    src_bytes = dir_bytes(src)
    sync = not args.no_sync
    notes: list[str] = []

    env_sf = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ops: list[tuple[str, callable]] = []
    ops.append(("copyfile", lambda d: ([sys.executable, "-c", COPY_SNIPPET, src, d], None, None)))
    if not args.no_cp:
        ops.append(("cp -r", lambda d: (["cp", "-r", src, d], None, None)))
    if not args.no_streamfold:
        ok, msg = streamfold_available(args.python)
        if ok:
            ops.append(("streamfold", lambda d: (
                [args.python, "-m", "streamfold", src, d, *passthrough], REPO, env_sf)))
            for v in args.variant:
                ops.append((f"streamfold {v}", lambda d, extra=shlex.split(v): (
                    [args.python, "-m", "streamfold", src, d, *passthrough, *extra], REPO, env_sf)))
        else:
            notes.append(f"streamfold skipped: `python -m streamfold --help` failed ({msg})")
    if args.reference and src_bytes * 1.8 > mem_total_bytes() and not args.force_reference:
        notes.append(f"reference skipped: it holds the whole checkpoint in RAM (peak 1.7-1.8x "
                     f"its size on llama-1b); {src_bytes / 1e9:.1f} GB would not fit "
                     f"(--force-reference to try anyway)")
        args.reference = False
    if args.reference:
        if not os.path.exists(args.reference_python):
            ap.error(f"--reference needs {args.reference_python} (see README.md)")
        ops.append(("reference", lambda d: (
            [args.reference_python, os.path.join(HERE, "reference_flashify.py"), src, d],
            REPO, None)))

    cold_status = None
    if args.cold:
        before = cached_kb()
        err = drop_caches()
        after = cached_kb()
        if err:
            cold_status = f"drop_caches failed: {err}"
            print(f"warning: {cold_status}; falling back to warm cache", file=sys.stderr)
            args.cold = False
        else:
            cold_status = f"works (Cached {before // 1024} MiB -> {after // 1024} MiB)"
        notes.append("cold: " + cold_status)

    load_before = os.getloadavg()
    digest_before = source_digest(os.path.join(REPO, "streamfold"))
    rss_file = os.path.join(work, ".maxrss") if use_gnu_time() else None
    rss_method = ("GNU time -f '%M %U %S' (child forked from `time`)" if rss_file else
                  "os.wait4 ru_maxrss (floor: this script's RSS, see rss_floor_kb)")
    results: dict[str, list[dict]] = {name: [] for name, _ in ops}
    for w in range(args.warmup):
        dst = os.path.join(work, f"warmup-{w}")
        if os.path.exists(dst):
            shutil.rmtree(dst)
        cmd, cwd, env = ops[0][1](dst)
        r = run_child(cmd, cwd, env, sync, rss_file)
        print(f"[warmup {w}] {ops[0][0]:10s} {r['wall_s']:8.2f} s (not counted)", file=sys.stderr)
        shutil.rmtree(dst, ignore_errors=True)
        os.sync()
    for run in range(args.runs):
        order = ops if run % 2 == 0 else list(reversed(ops))
        for name, make_cmd in order:
            dst = os.path.join(work, f"out-{name.replace(' ', '').replace('-', '')}-{run}")
            if os.path.exists(dst):
                shutil.rmtree(dst)
            cmd, cwd, env = make_cmd(dst)
            if args.cold:
                drop_caches()
            else:
                os.sync()
                prewarm(src)
            r = run_child(cmd, cwd, env, sync, rss_file)
            r["out_bytes"] = dir_bytes(dst) if os.path.isdir(dst) else 0
            r["out_safetensors_bytes"] = dir_bytes(dst, ".safetensors") if os.path.isdir(dst) else 0
            r["run"] = run
            results[name].append(r)
            status = "ok" if r["rc"] == 0 else f"FAILED rc={r['rc']}"
            print(f"[run {run}] {name:10s} {r['wall_s']:8.2f} s  cpu {r['cpu_s']:7.2f} s  peak RSS {r['maxrss_kb'] / 1024:8.1f} MiB"
                  f"  out {r['out_bytes'] / 1e9:.3f} GB  {status}", file=sys.stderr)
            if r["rc"] != 0:
                print(r["stderr_tail"], file=sys.stderr)
            if os.path.exists(dst):
                shutil.rmtree(dst)
            os.sync()
    if rss_file and os.path.exists(rss_file):
        os.remove(rss_file)
    try:
        os.rmdir(work)
    except OSError:
        pass

    if source_digest(os.path.join(REPO, "streamfold")) != digest_before:
        notes.append("streamfold/*.py changed while the benchmark ran: runs may mix code states")
    summary: dict[str, dict] = {}
    for name, rs in results.items():
        good = [r for r in rs if r["rc"] == 0]
        t = median([r["wall_s"] for r in good])
        summary[name] = {
            "runs_ok": len(good), "runs": len(rs),
            "wall_s": [round(r["wall_s"], 3) for r in rs],
            "median_s": round(t, 3) if t else None,
            "min_s": round(min(r["wall_s"] for r in good), 3) if good else None,
            "gb_per_s": round(src_bytes / 1e9 / t, 3) if t else None,
            "cpu_s_median": round(median([r["cpu_s"] for r in good]), 2) if good else None,
            "peak_rss_mib_median": round(median([r["maxrss_kb"] for r in good]) / 1024, 1) if good else None,
            "peak_rss_mib_max": round(max(r["maxrss_kb"] for r in good) / 1024, 1) if good else None,
            "out_bytes": good[-1]["out_bytes"] if good else None,
            "out_safetensors_bytes": good[-1]["out_safetensors_bytes"] if good else None,
        }
        if len(good) < len(rs):
            summary[name]["last_error"] = next(r for r in reversed(rs) if r["rc"] != 0)["stderr_tail"]
    base = summary.get("copyfile", {}).get("median_s")
    for name, s in summary.items():
        s["ratio_to_copyfile"] = round(s["median_s"] / base, 3) if base and s["median_s"] else None
    ratios = {}
    sf, ref = summary.get("streamfold"), summary.get("reference")
    if sf and ref and sf["median_s"] and ref["median_s"]:
        ratios = {
            "reference_time_over_streamfold": round(ref["median_s"] / sf["median_s"], 2),
            "reference_rss_over_streamfold": round(ref["peak_rss_mib_max"] / sf["peak_rss_mib_max"], 2),
        }

    doc = {
        "label": label, "src": src, "src_bytes": src_bytes, "runs": args.runs,
        "cache": "cold" if args.cold else "warm", "sync_in_timing": sync,
        "warmup_runs": args.warmup,
        "peak_rss_method": rss_method,
        "streamfold_args": passthrough,
        "streamfold_source_sha256_16": digest_before,
        "command": "python benchmarks/bench.py " + " ".join(shlex.quote(a) for a in original_argv),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "loadavg_1_5_15": {"start": [round(x, 2) for x in load_before],
                           "end": [round(x, 2) for x in os.getloadavg()]},
        "notes": notes, "summary": summary, "streamfold_vs_reference": ratios,
        "per_run": {n: [{k: v for k, v in r.items() if k not in ("stdout_tail", "stderr_tail")}
                        for r in rs] for n, rs in results.items()},
    }

    cache = doc["cache"]
    extra = " ".join(passthrough) or "-"
    print("| checkpoint | cache | operation | args | runs ok | median s | min s | GB/s | x copyfile | CPU s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        argcol = (" ".join([*passthrough, name[len("streamfold "):]]) if name.startswith("streamfold ") else extra) \
            if name.startswith("streamfold") else "-"
        fmt = lambda v, f: (f % v) if v is not None else "n/a"
        print(f"| {label} ({src_bytes / 1e9:.2f} GB) | {cache} | {name} | {argcol} | "
              f"{s['runs_ok']}/{s['runs']} | {fmt(s['median_s'], '%.2f')} | {fmt(s['min_s'], '%.2f')} | "
              f"{fmt(s['gb_per_s'], '%.2f')} | {fmt(s['ratio_to_copyfile'], '%.2f')} | "
              f"{fmt(s['cpu_s_median'], '%.1f')} | "
              f"{fmt(s['peak_rss_mib_max'], '%.0f')} |")
    for n in notes:
        print(f"\nNote: {n}")
    if ratios:
        print(f"\nreference / streamfold: time x{ratios['reference_time_over_streamfold']}, "
              f"peak RSS x{ratios['reference_rss_over_streamfold']}")
    js = json.dumps(doc, indent=2)
    print(js)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(js + "\n")
    failed = any(s["runs_ok"] < s["runs"] for s in summary.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
