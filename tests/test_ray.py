"""The Ray executor on a real local cluster (2 CPUs): same bytes as the local engine, and a worker that
dies mid-shard is retried without leaving anything that looks complete."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import streamfold
from streamfold.ray_executor import CRASH_DIR_ENV

from .test_tasks import _env, _files, neox  # noqa: F401 - the GPT-NeoX fixture (3 shards, bias folds)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ray = pytest.importorskip("ray")
    crash = tmp_path_factory.mktemp("crash")
    old = {k: os.environ.get(k) for k in (CRASH_DIR_ENV, "PYTHONPATH", "RAY_agent_register_timeout_ms")}
    # the raylet waits 15 s for its agents by default: too short on a loaded 2-core machine
    os.environ["RAY_agent_register_timeout_ms"] = "180000"
    os.environ[CRASH_DIR_ENV] = str(crash)  # the workers inherit the driver's environment
    os.environ["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    ray.init(num_cpus=2, object_store_memory=80 << 20, include_dashboard=False, logging_level="ERROR")
    try:
        yield crash
    finally:
        ray.shutdown()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def local_ref(neox, tmp_path_factory):  # noqa: F811
    ref = tmp_path_factory.mktemp("ref") / "out"
    streamfold.convert(neox, ref, manifest=True)
    return ref


def test_ray_output_is_byte_identical(cluster, neox, local_ref, tmp_path):  # noqa: F811
    out = tmp_path / "out"  # the card names DST's folder: the same name as the reference
    rep = streamfold.convert(neox, out, manifest=True, executor="ray", workers=1, memory_budget=1 << 20)
    assert rep.bytes_out > 0
    assert _files(out) == _files(local_ref)
    v = streamfold.verify(neox, out)  # checked against the records the driver planned, not the engine's run
    assert v.ok and v.counts["biases"] == 4 and v.manifest == "ok", v.summary()


def test_killed_ray_task_is_retried(cluster, neox, local_ref, tmp_path):  # noqa: F811
    (cluster / "arm").write_text("")
    out = tmp_path / "out"  # the card names DST's folder: the same name as the reference
    streamfold.convert(neox, out, manifest=True, executor="ray", workers=1, memory_budget=1 << 20)
    fired = list(cluster.glob("fired-*"))
    assert len(fired) == 1 and not (cluster / "arm").exists()  # one attempt really died mid-shard
    assert _files(out) == _files(local_ref)  # no .partial left, every shard whole
    assert not list(tmp_path.glob(".*"))  # no staging folder left beside it


def test_missing_ray_is_one_line_naming_the_extra(neox, tmp_path):  # noqa: F811
    code = ("import sys; sys.modules['ray'] = None; from streamfold.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, str(neox), str(tmp_path / "o"), "--ray", "-q"],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == ('streamfold: error: --ray needs Ray, which is not installed: '
                                'pip install "streamfold[ray]"')
    assert not (tmp_path / "o").exists() and not list(tmp_path.iterdir())
