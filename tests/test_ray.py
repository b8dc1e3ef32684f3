"""The Ray executor on a real local cluster (2 CPUs): same bytes as the local engine, and a worker that
dies mid-shard is retried without leaving anything that looks complete; from a Hub repo (the local Hub
server over real HTTP) each task fetches only its own source shard and the driver downloads no weights;
``--stream --ray`` makes one commit, and none when a task or its check fails.

Faults are injected from the test side: the cluster's ``worker_process_setup_hook`` (:func:`_inject_faults`)
patches the engine in every worker process; marker files in the folder ``FAULTS_ENV`` names arm them."""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import streamfold
from streamfold import cli

from .hubserver import HubServer, point_client_at
from .test_engine import RULES
from .test_stream import REPO, layered  # noqa: F401 - four shards, one layer each
from .test_tasks import _env, _files, neox  # noqa: F401 - the GPT-NeoX fixture (3 shards, bias folds)

FAULTS_ENV = "STREAMFOLD_TEST_FAULTS"


def _inject_faults() -> None:
    """Runs in every Ray worker process at start. Markers in ``$STREAMFOLD_TEST_FAULTS``:
    ``crash`` -- the first task attempt that takes it (an atomic rename) dies after its first write, mid-shard;
    ``fail-<shard>`` -- the task writing that shard raises; ``wrong`` -- folded chunks come out one bit off."""
    folder = Path(os.environ[FAULTS_ENV])
    from streamfold.run import engine
    run, scale = engine.Engine.run, engine.scale_chunk

    def faulty_run(self, tasks, sources, out_dir, progress=None, **kw):
        for t in tasks:
            if (folder / f"fail-{t.shard}").exists():
                raise RuntimeError(f"injected failure in {t.shard}")
        try:
            os.rename(folder / "crash", folder / f"crashed-{os.getpid()}")
        except OSError:
            pass
        else:
            def progress(_n):  # noqa: F811 - called after each write: die mid-shard
                os._exit(17)
        return run(self, tasks, sources, out_dir, progress, **kw)

    def faulty_scale(src, mult, sd, od, out, s):
        scale(src, mult, sd, od, out, s)
        if (folder / "wrong").exists():
            out.view(np.uint16).reshape(-1)[0] ^= 1
    engine.Engine.run, engine.scale_chunk = faulty_run, faulty_scale


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray cluster for the module, with the fault hook, a temporary directory of its own for
    the workers (to see what tasks leave there) and a local Hub the workers see too: huggingface_hub
    reads its environment at import, so HF_ENDPOINT and friends are set before the workers start."""
    ray = pytest.importorskip("ray")
    root = tmp_path_factory.mktemp("cluster")
    faults, tmp = root / "faults", root / "tmp"
    faults.mkdir(), tmp.mkdir()
    server = HubServer().start()
    with pytest.MonkeyPatch.context() as mp:
        # the raylet waits 15 s for its agents by default: too short on a loaded 2-core machine
        mp.setenv("RAY_agent_register_timeout_ms", "180000")
        mp.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))  # workers import tests.test_ray
        point_client_at(mp, server.url, root / "hf-home", token=server.token)
        ray.init(num_cpus=2, object_store_memory=80 << 20, include_dashboard=False, logging_level="ERROR",
                 runtime_env={"worker_process_setup_hook": "tests.test_ray._inject_faults",
                              "env_vars": {FAULTS_ENV: str(faults), "TMPDIR": str(tmp)}})
        try:
            yield {"faults": faults, "tmp": tmp, "hub": server, "hf_home": root / "hf-home"}
        finally:
            ray.shutdown()
            server.stop()


@pytest.fixture
def faults(cluster):
    yield cluster["faults"]
    for p in cluster["faults"].iterdir():
        p.unlink()
    for _ in range(100):  # a cancelled task cleans up as it stops, maybe just after the driver returned
        left = list(cluster["tmp"].glob("streamfold-*"))
        if not left:
            break
        time.sleep(0.1)
    assert not left  # every task removed what it fetched


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


def test_killed_ray_task_is_retried(faults, neox, local_ref, tmp_path):  # noqa: F811
    (faults / "crash").write_text("")
    out = tmp_path / "out"  # the card names DST's folder: the same name as the reference
    streamfold.convert(neox, out, manifest=True, executor="ray", workers=1, memory_budget=1 << 20)
    assert len(list(faults.glob("crashed-*"))) == 1 and not (faults / "crash").exists()  # one attempt died
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


# --- from the Hub ----------------------------------------------------------------------------------------

def _shard_gets(requests, whole: bool) -> list[str]:
    return [r.path.rsplit("/", 1)[-1] for r in requests if r.method == "GET" and "/resolve/" in r.path
            and r.path.endswith(".safetensors") and ("range" not in r.headers) == whole]


def _hub_repo(cluster, layered, name=REPO):  # noqa: F811
    hub = cluster["hub"]
    if name not in hub.repos:
        hub.add_repo(name, layered)
    return hub


def _cached_weights(cluster, repo: str) -> list[Path]:
    return list((cluster["hf_home"] / "hub" / f"models--{repo.replace('/', '--')}").rglob("*.safetensors"))


@pytest.mark.full
def test_ray_from_hub_fetches_each_shard_once_in_its_task(cluster, faults, layered, tmp_path):  # noqa: F811
    repo = "org/toy-fetch"  # a repo of its own: nothing of it in the HF cache from other tests
    hub = _hub_repo(cluster, layered, repo)
    before = len(hub.requests)
    out = tmp_path / "a" / "out"
    streamfold.convert(repo, out, rules=RULES, manifest=True, executor="ray", workers=1, memory_budget=1 << 20)
    reqs = hub.requests[before:]
    shards = sorted(p.name for p in layered.glob("*.safetensors"))
    assert sorted(_shard_gets(reqs, whole=True)) == shards  # each fetched whole exactly once, by its task
    assert len(_shard_gets(reqs, whole=False)) >= 2 * len(shards)  # the driver: headers + norms by Range
    assert not _cached_weights(cluster, repo)  # the driver downloaded no weights into its cache
    assert not list((tmp_path / "a").glob(".*"))  # no staging or remote-plan folder left
    ref = tmp_path / "b" / "out"  # the card names DST's folder: the same name
    streamfold.convert(repo, ref, rules=RULES, manifest=True)  # the local engine, from a full download
    assert _cached_weights(cluster, repo)  # (which the check above would have seen)
    assert _files(out) == _files(ref)


@pytest.mark.full
def test_ray_from_hub_retries_a_killed_task(cluster, faults, layered, tmp_path):  # noqa: F811
    hub = _hub_repo(cluster, layered)
    (faults / "crash").write_text("")
    out = tmp_path / "a" / "out"
    streamfold.convert(REPO, out, rules=RULES, executor="ray", workers=1, memory_budget=1 << 20)
    assert len(list(faults.glob("crashed-*"))) == 1
    assert not list((tmp_path / "a").glob(".*"))
    ref = tmp_path / "b" / "out"
    streamfold.convert(REPO, ref, rules=RULES)
    assert _files(out) == _files(ref) and hub.commits(REPO)  # every shard whole, none from the dead attempt


@pytest.mark.full
def test_stream_ray_makes_one_commit_equal_to_local_stream(cluster, faults, layered, tmp_path):  # noqa: F811
    repo = "org/toy-stream"  # a repo of its own: no other test put its shards in the (shared) HF cache, from
    hub = _hub_repo(cluster, layered, repo)  # which huggingface_hub would copy them instead of fetching
    dest = "me/ray-stream"
    before = len(hub.requests)
    rep = streamfold.convert(repo, tmp_path / "r" / "small", rules=RULES, push_to_hub=dest, stream=True,
                             executor="ray", manifest=True, verify=True, workers=1, memory_budget=1 << 20)
    commits = hub.commits(dest)
    assert len(commits) == 2  # the repo's initial commit, and ours
    shards = sorted(p.name for p in layered.glob("*.safetensors"))
    assert sorted(_shard_gets(hub.requests[before:], whole=True)) == shards
    shard = max(p.stat().st_size for p in layered.glob("*.safetensors"))
    assert rep.peak_disk < 2 * shard + 64 * 1024  # per task: its source shard + its output shard
    assert "peak local disk" in rep.summary() and "(per Ray task, on its worker)" in rep.summary()
    ray_files = hub.files(dest)
    hub.add_commit(dest, {}, delete=[p for p in ray_files if p != ".gitattributes"])  # so the next one differs
    streamfold.convert(repo, tmp_path / "l" / "small", rules=RULES, push_to_hub=dest, stream=True,
                       manifest=True, verify=True, workers=1, memory_budget=1 << 20)
    assert len(hub.commits(dest)) == 4
    assert hub.files(dest) == ray_files  # every file, card and manifest included
    assert sorted(ray_files) == sorted(shards + ["config.json", "model.safetensors.index.json", "tokenizer.json",
                                                 "README.md", "SHA256SUMS", ".gitattributes"])
    assert _files(tmp_path / "r" / "small") == _files(tmp_path / "l" / "small")  # DST: the small files
    assert not list((tmp_path / "r").glob(".*"))


@pytest.mark.parametrize("fault, code, message", [
    pytest.param("fail-model-00003-of-00004.safetensors", 2,
                 "streamfold: error: model-00003-of-00004.safetensors: Ray task failed: RuntimeError: injected "
                 "failure in model-00003-of-00004.safetensors", marks=pytest.mark.full),
    pytest.param("wrong", 3, "streamfold: error: verification of model-0000", marks=pytest.mark.full)])
def test_stream_ray_commits_nothing_when_a_task_fails(cluster, faults, layered, tmp_path, capsys,  # noqa: F811
                                                     fault, code, message):
    hub = _hub_repo(cluster, layered)
    dest = f"me/ray-fail-{code}"
    (faults / fault).write_text("")
    rules = tmp_path / "rules.json"
    rules.write_text(__import__("json").dumps({"families": RULES}))
    argv = [REPO, str(tmp_path / "small"), "--push-to-hub", dest, "--stream", "--ray", "--verify", "--rules",
            str(rules), "--workers", "1", "-q"]
    assert cli.main(argv) == code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(message), err
    assert len(hub.commits(dest)) == 1  # only the new repo's initial commit: nothing of ours
    assert not list(tmp_path.glob(".*"))


@pytest.mark.full
def test_ray_from_hub_verify_checks_each_shard_in_its_task(cluster, faults, layered, tmp_path):  # noqa: F811
    _hub_repo(cluster, layered)
    (faults / "wrong").write_text("")
    out = tmp_path / "out"
    with pytest.raises(streamfold.StreamfoldError, match=r"verification of model-0000\d-of-00004.safetensors failed"):
        streamfold.convert(REPO, out, rules=RULES, executor="ray", verify=True, workers=1, memory_budget=1 << 20)
    assert not out.exists()  # nothing published
    staged = [p for p in tmp_path.rglob("model-*.safetensors")]
    assert not staged  # a shard that failed its check never stays under its name (a resume would adopt it)
