"""Output staging: DST is always the complete old or the complete new checkpoint, whatever kills it.

Kills are real signals to a real ``python -m streamfold`` child. To make the moments reproducible the
child is slowed or made to SIGKILL itself at a named point by wrapping functions in the child only
(the product code is not told it is being tested).
"""
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import streamfold
from streamfold.run import staging
from streamfold.core.errors import StreamfoldError
from streamfold.run.staging import Staging
from tests.representatives import matrix

SAMPLE = Path(__file__).resolve().parents[1] / "streamfold" / "sample"
ROOT = SAMPLE.parents[1]

# A child CLI whose folded-tensor writes sleep SF_SLOW seconds each (11 of them for the sample), and
# which SIGKILLs itself at the point named by SF_KILL_AT.
CHILD = r"""
import os, signal, sys, time
import streamfold.run.engine as engine
import streamfold.run.staging as staging

slow = float(os.environ.get("SF_SLOW", "0"))
point = os.environ.get("SF_KILL_AT", "")
pause = float(os.environ.get("SF_PAUSE", "0"))

def die(where):
    if point == where:
        os.kill(os.getpid(), signal.SIGKILL)

real_write = engine.pwrite_all
def slow_write(*a, **k):
    time.sleep(slow)
    return real_write(*a, **k)
engine.pwrite_all = slow_write

real_rename2 = staging._renameat2
def rename2(a, b, flags):
    if os.environ.get("SF_NO_RENAMEAT2"):
        return False
    die("rename-before"); time.sleep(pause)
    ok = real_rename2(a, b, flags)
    time.sleep(pause); die("rename-after")
    return ok
staging._renameat2 = rename2

real_rename = os.rename
calls = []
def rename(a, b, *args, **kw):
    real_rename(a, b, *args, **kw)
    if str(b).endswith(staging.OLD_SUFFIX):  # the fallback's first rename: DST -> .NAME.streamfold-old
        calls.append(a)
        time.sleep(pause); die("fallback-between")
staging.os.rename = rename

real_remove = staging.remove_tree
def remove(path):
    die("remove-before"); time.sleep(pause)
    if point == "remove-mid":
        files = sorted(p for p in path.rglob("*") if p.is_file())
        files[0].unlink()
        die("remove-mid")
    real_remove(path)
staging.remove_tree = remove

from streamfold.cli import main
sys.exit(main(sys.argv[1:]))
"""


def env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), **{k: str(v) for k, v in extra.items()}}


def cli(*args, cwd=None, **kw):
    return subprocess.run([sys.executable, "-m", "streamfold", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env(), **kw)


def child(*args, **extra):
    return subprocess.Popen([sys.executable, "-c", CHILD, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(**extra))


def tree_hash(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def wait_for_shards(partial: Path, proc, timeout=60.0) -> None:
    """Until the child has created its output shards in the staging folder."""
    t0 = time.monotonic()
    # shards are written as ``NAME.partial`` and renamed when complete (engine.partial_name)
    while not (partial.is_dir() and any(partial.glob("*.safetensors*"))):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, "conversion never started"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Two different complete checkpoints: 'old' (strict) and 'new' (compat, what the tests write), in
    folders named "out" as the tests' DST (the model card names DST's folder)."""
    root = tmp_path_factory.mktemp("versions")
    for name, mode in (("old", "strict"), ("new", "compat")):
        r = cli(SAMPLE, root / name / "out", "--mode", mode, "-q")
        assert r.returncode == 0, r.stderr
    return {name: tree_hash(root / name / "out") for name in ("old", "new")}, root


def leftovers(parent: Path, keep=("out",)) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


# --- paths ------------------------------------------------------------------------------------------

def test_dst_dot_and_relative_paths(tmp_path, versions):
    hashes, _ = versions
    here = tmp_path / "out"
    here.mkdir()
    r = cli(SAMPLE, ".", cwd=here)
    assert r.returncode == 0, r.stderr
    assert tree_hash(here) == hashes["new"]
    assert leftovers(tmp_path) == []  # no stray staging folder or lock
    r = cli(SAMPLE, "rel/out", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert tree_hash(tmp_path / "rel" / "out") == hashes["new"]
    assert leftovers(tmp_path / "rel") == []
    r = cli(SAMPLE, ".", "--overwrite", cwd=here)  # replacing the current folder: it follows, one note
    assert r.returncode == 0, r.stderr
    assert "was the current folder" in r.stderr and tree_hash(here) == hashes["new"]


def test_dst_in_source_still_refused(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(SAMPLE, src)
    for dst, cwd in ((".", src), ("sub", src), (f"{src}/./x/..", None)):
        r = cli(src, dst, cwd=cwd)
        assert r.returncode == 2 and "source" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# --- modes ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", matrix([0o022, 0o027, 0o002], {0o027}))
def test_output_modes_follow_the_umask(tmp_path, umask):
    src = tmp_path / "src"
    shutil.copytree(SAMPLE, src)
    (src / "tokenizer").mkdir()
    (src / "tokenizer" / "vocab.txt").write_text("a b c")
    os.chmod(src / "generation_config.json", 0o600)  # a private source file: cp would not keep 0600 here
    os.chmod(src / "tokenizer" / "vocab.txt", 0o444)
    dst = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "streamfold", str(src), str(dst), "-q", "--manifest"],
                       capture_output=True, text=True, env=env(), preexec_fn=lambda: os.umask(umask))
    assert r.returncode == 0, r.stderr
    want_dir, want_file = 0o777 & ~umask, 0o666 & ~umask
    assert stat.S_IMODE(dst.stat().st_mode) == want_dir
    assert stat.S_IMODE((dst / "tokenizer").stat().st_mode) == want_dir
    files = [p for p in dst.rglob("*") if p.is_file()]
    assert len(files) == 9  # 3 shards, index, config, card, generation config, vocab, SHA256SUMS
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == want_file, p


# --- the lock ---------------------------------------------------------------------------------------

def test_live_owner_is_refused(tmp_path):
    dst = tmp_path / "out"
    with Staging(dst) as st:
        rec = json.loads(st.lock_path.read_text())
        assert rec["pid"] == os.getpid() and rec["phase"] == "writing" and "host" in rec and "argv" in rec
        assert st.lock_path.parent == st.path.parent == tmp_path  # beside the staging folder, not in it
        with pytest.raises(StreamfoldError, match=f"another streamfold \\(pid {os.getpid()}\\) is writing"):
            Staging(dst).__enter__()
        r = cli(SAMPLE, dst)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip() == (f"streamfold: error: {dst}: another streamfold (pid {os.getpid()}) is "
                                    f"writing it (lock {st.lock_path})")
        assert st.path.is_dir() and not dst.exists()  # ours, untouched
    assert leftovers(tmp_path) == []


def test_dead_owner_folder_is_adopted_only_when_asked(tmp_path):
    dst = tmp_path / "out"
    partial = tmp_path / ".out.streamfold-partial"
    partial.mkdir()
    (partial / "done.safetensors").write_bytes(b"x")
    (tmp_path / ".out.streamfold-lock").write_text(json.dumps({"pid": 999999, "phase": "writing"}))
    asked = []
    with Staging(dst, adopt=lambda p, owner: asked.append((p, owner["pid"])) or True) as st:
        assert st.adopted and (st.path / "done.safetensors").read_bytes() == b"x"
        assert asked == [(partial, 999999)]
    lines = []
    partial.mkdir()
    (tmp_path / ".out.streamfold-lock").write_text(json.dumps({"pid": 999999, "phase": "writing"}))
    with Staging(dst, log=lines.append) as st:
        assert not st.adopted and list(st.path.iterdir()) == []
    assert len(lines) == 1 and str(partial) in lines[0] and "pid 999999" in lines[0]


# --- signals ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig,code,word,workers", matrix([(signal.SIGTERM, 143, "terminated (SIGTERM)", "1"),
                                                          (signal.SIGTERM, 143, "terminated (SIGTERM)", "3"),
                                                          (signal.SIGINT, 130, "interrupted", "3")],
                                                         lambda c: c[3] == "3"))
def test_signal_mid_conversion_cleans_up(tmp_path, sig, code, word, workers):
    dst = tmp_path / "out"
    proc = child(SAMPLE, dst, "--workers", workers, "--memory-budget", "1M", SF_SLOW=0.2)
    wait_for_shards(tmp_path / ".out.streamfold-partial", proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)  # exits: the worker threads and the writer stopped
    assert proc.returncode == code, err
    assert err.strip() == f"streamfold: {word}; partial output removed"
    assert sorted(os.listdir(tmp_path)) == []  # no DST, no staging folder, no lock


def test_sigkill_then_rerun_reclaims(tmp_path, versions):
    hashes, _ = versions
    dst = tmp_path / "out"
    proc = child(SAMPLE, dst, "--workers", "1", SF_SLOW=0.2)
    partial = tmp_path / ".out.streamfold-partial"
    wait_for_shards(partial, proc)
    proc.kill()
    proc.communicate()
    assert partial.is_dir() and (tmp_path / ".out.streamfold-lock").is_file() and not dst.exists()
    r = cli(SAMPLE, dst, "--no-resume")  # reclaimed, not resumed (resuming it: tests/test_resume.py)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"streamfold: removed {partial}, partial output of a killed "
                                                   f"run (pid {proc.pid}, started ")
    assert tree_hash(dst) == hashes["new"]
    assert leftovers(tmp_path) == []


# --- kills during --overwrite -------------------------------------------------------------------------

def _old_dst(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "out"
    shutil.copytree(root / "old" / "out", dst)
    return dst


@pytest.mark.parametrize("point,after", matrix([("rename-before", "old"), ("rename-after", "new"),
                                                ("remove-before", "new"), ("remove-mid", "new")],
                                               {("rename-before", "old"), ("remove-mid", "new")}))
def test_sigkill_at_each_publish_step(tmp_path, versions, point, after):
    hashes, root = versions
    dst = _old_dst(root, tmp_path)
    proc = child(SAMPLE, dst, "--overwrite", SF_KILL_AT=point)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert tree_hash(dst) == hashes[after]
    r = cli(SAMPLE, dst, "--overwrite")  # the next run cleans up after it and finishes the job
    assert r.returncode == 0, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and f"pid {proc.pid}" in r.stderr, r.stderr
    assert tree_hash(dst) == hashes["new"] and leftovers(tmp_path) == []


@pytest.mark.full
def test_sigkill_at_a_spread_of_moments(tmp_path, versions):
    hashes, root = versions
    t0 = time.monotonic()
    dst = _old_dst(root, tmp_path)
    proc = child(SAMPLE, dst, "--overwrite", "-q", SF_PAUSE=0.15)
    proc.communicate(timeout=60)
    total = time.monotonic() - t0
    assert proc.returncode == 0 and tree_hash(dst) == hashes["new"]
    seen = []
    for i in range(6):
        shutil.rmtree(dst)
        dst = _old_dst(root, tmp_path)
        proc = child(SAMPLE, dst, "--overwrite", "-q", SF_PAUSE=0.15)
        time.sleep(total * (0.25 + 1.35 * i / 5))  # 0.25x .. 1.6x: the last ones land after the publish even on a slower run
        proc.kill()
        proc.communicate()
        got = tree_hash(dst)
        assert got in (hashes["old"], hashes["new"]), f"kill {i}: DST is neither checkpoint"
        seen.append("old" if got == hashes["old"] else "new")
        r = cli(SAMPLE, dst, "--overwrite", "-q")
        assert r.returncode == 0 and tree_hash(dst) == hashes["new"] and leftovers(tmp_path) == []
    assert {"old", "new"} <= set(seen), seen  # the kills landed on both sides of the publish


def test_fallback_without_renameat2(tmp_path, versions):
    """Where renameat2 is refused: two renames through a fixed name, undone by the next run."""
    hashes, root = versions
    dst = _old_dst(root, tmp_path)
    r = subprocess.run([sys.executable, "-c", CHILD, str(SAMPLE), str(dst), "--overwrite", "-q"],
                       capture_output=True, text=True, env=env(SF_NO_RENAMEAT2=1))
    assert r.returncode == 0, r.stderr
    assert tree_hash(dst) == hashes["new"] and leftovers(tmp_path) == []
    shutil.rmtree(dst)
    dst = _old_dst(root, tmp_path)
    proc = child(SAMPLE, dst, "--overwrite", SF_NO_RENAMEAT2=1, SF_KILL_AT="fallback-between")
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    old = tmp_path / ".out.streamfold-old"
    assert not dst.exists() and tree_hash(old) == hashes["old"]  # the one moment without DST: recognizable
    r = cli(SAMPLE, dst)  # without --overwrite: the old checkpoint comes back, and is then kept
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert f"streamfold: restored {dst} from {old}" in r.stderr
    assert tree_hash(dst) == hashes["old"] and leftovers(tmp_path) == []


def test_library_staging_publish_and_exchange(tmp_path, monkeypatch):
    """An empty DST is exchanged too; with renameat2 unavailable the fallback gives the same result."""
    for fallback in (False, True):
        if fallback:
            monkeypatch.setattr(staging, "_renameat2", lambda a, b, flags: False)
        dst = tmp_path / f"d{int(fallback)}"
        dst.mkdir()
        inode = dst.stat().st_ino
        with Staging(dst) as st:
            (st.path / "f").write_text("new")
            st.publish()
        assert dst.stat().st_ino != inode and (dst / "f").read_text() == "new"
        assert sorted(os.listdir(tmp_path)) == [f"d{i}" for i in range(int(fallback) + 1)]
    report = streamfold.convert(SAMPLE, tmp_path / "d0", overwrite=True)
    assert report.dst == str(tmp_path / "d0") and (tmp_path / "d0" / "config.json").is_file()


@pytest.mark.parametrize("workers", matrix([1, 3], {3}))
def test_interrupt_in_process_stops_every_thread(tmp_path, workers):
    """Terminated raised mid-run (as the SIGTERM handler does): no thread survives, nothing is left."""
    import threading
    before = set(threading.enumerate())
    calls = []

    def progress(total):
        def tick(n):
            calls.append(n)
            if len(calls) == 3:
                raise staging.Terminated()
        return tick
    with pytest.raises(staging.Terminated):
        streamfold.convert(SAMPLE, tmp_path / "out", workers=workers, memory_budget=1 << 20, manifest=True,
                           progress=progress)
    assert len(calls) == 3
    assert set(threading.enumerate()) <= before
    assert os.listdir(tmp_path) == []
