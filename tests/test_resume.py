"""Resume: SIGKILL a conversion at several points, run the same command again: the output is byte-identical,
completed shards are re-used untouched, and a changed source or option refuses them (one line says why)."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import streamfold
from streamfold.run.journal import JOURNAL
from streamfold.run.staging import PARTIAL_SUFFIX

from .test_engine import RULES
from .test_stream import layered  # noqa: F401 - four one-layer shards
from .test_tasks import _env, _files
from tests.representatives import matrix

# Runs the CLI with a kill injected by the test (not by streamfold): after the N-th journaled shard,
# or at the K-th kernel copy (mid-shard).
KILLER = """
import os, signal, sys
from streamfold import cli
from streamfold.run import engine
from streamfold.run import journal
what, n = sys.argv[1], int(sys.argv[2])
count = [0]
def bump():
    count[0] += 1
    if count[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
if what == "shards":
    real = journal.Journal.record
    def record(self, *a):
        real(self, *a); bump()
    journal.Journal.record = record
else:
    real_copy = engine.copy_range
    def copy_range(*a):
        bump(); real_copy(*a)
    engine.copy_range = copy_range
sys.exit(cli.main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("rules") / "rules.json"
    p.write_text(json.dumps({"families": RULES}))
    return p


@pytest.fixture(scope="module")
def reference(layered, rules_file, tmp_path_factory):  # noqa: F811
    ref = tmp_path_factory.mktemp("ref") / "out"  # the same command, never interrupted
    assert _again(layered, ref, rules_file, "--manifest").returncode == 0
    return _files(ref)


def staging_path(dst: Path) -> Path:
    return dst.parent / f".{dst.name}{PARTIAL_SUFFIX}"


def _killed(src, dst, rules, what, n, *extra):
    r = subprocess.run([sys.executable, "-c", KILLER, what, str(n), str(src), str(dst), "--rules", str(rules),
                        "--workers", "2", *extra], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)


def _again(src, dst, rules, *extra):
    return subprocess.run([sys.executable, "-m", "streamfold", str(src), str(dst), "--rules", str(rules),
                           *extra], capture_output=True, text=True, env=_env(), timeout=300)


def _shard_ids(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("model-*.safetensors")}


@pytest.mark.parametrize("what,n,kept", matrix([("copies", 1, 0), ("shards", 1, 1), ("shards", 3, 3)], {("shards", 1, 1)}))
def test_sigkill_then_same_command_resumes(layered, rules_file, reference, tmp_path, what, n, kept):  # noqa: F811
    dst = tmp_path / "out"
    _killed(layered, dst, rules_file, what, n, "--manifest")
    staging = staging_path(dst)
    assert not dst.exists() and staging.is_dir()
    before = _shard_ids(staging)
    assert len(before) == kept  # completed shards have their final names; the killed one does not
    journal = json.loads((staging / JOURNAL).read_text())
    assert sorted(journal["shards"]) == sorted(before)
    r = _again(layered, dst, rules_file, "--manifest")
    assert r.returncode == 0, r.stderr
    if kept:
        assert f"re-using {kept} completed shard(s)" in r.stderr
    assert _files(dst) == reference  # byte-identical, manifest included
    after = _shard_ids(dst)
    for shard, ident in before.items():  # re-used, not rewritten: same inode, same mtime
        assert after[shard] == ident, shard
    assert not staging.exists()


def test_changed_option_starts_fresh_and_says_why(layered, rules_file, tmp_path):  # noqa: F811
    dst = tmp_path / "out"
    _killed(layered, dst, rules_file, "shards", 2)
    before = _shard_ids(staging_path(dst))
    assert len(before) == 2
    r = _again(layered, dst, rules_file, "--mode", "strict")
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if "not resuming" in x]
    assert len(lines) == 1 and "option mode changed ('compat' -> 'strict')" in lines[0]
    after = _shard_ids(dst)
    assert all(after[s] != before[s] for s in before)  # rewritten
    ref = tmp_path / "ref" / "out"  # the card names DST's folder: the same name
    assert _again(layered, ref, rules_file, "--mode", "strict").returncode == 0
    assert _files(dst) == _files(ref)


@pytest.mark.full
def test_changed_source_refuses_the_shards(layered, rules_file, tmp_path):  # noqa: F811
    src = tmp_path / "src"
    shutil.copytree(layered, src)
    dst = tmp_path / "out"
    _killed(src, dst, rules_file, "shards", 2)
    os.utime(src / "model-00004-of-00004.safetensors", ns=(1, 1))  # e.g. re-downloaded
    r = _again(src, dst, rules_file)
    assert r.returncode == 0, r.stderr
    assert "source model-00004-of-00004.safetensors changed (modification time)" in r.stderr
    assert "re-using" not in r.stderr


@pytest.mark.full
def test_tampered_shard_is_redone(layered, rules_file, reference, tmp_path):  # noqa: F811
    dst = tmp_path / "out"
    _killed(layered, dst, rules_file, "shards", 2, "--manifest")
    staging = staging_path(dst)
    victim = sorted(_shard_ids(staging))[0]
    with open(staging / victim, "r+b") as f:  # same size, rewritten in place
        f.seek(-1, 2)
        f.write(b"\0")
    r = _again(layered, dst, rules_file, "--manifest")
    assert r.returncode == 0, r.stderr
    assert "re-using 1 completed shard(s); redoing 1 that did not check out" in r.stderr
    assert _files(dst) == reference


def test_no_resume_discards(layered, rules_file, tmp_path):  # noqa: F811
    dst = tmp_path / "out"
    _killed(layered, dst, rules_file, "shards", 1)
    r = _again(layered, dst, rules_file, "--no-resume")
    assert r.returncode == 0 and "partial output of a killed run" in r.stderr and "re-using" not in r.stderr
