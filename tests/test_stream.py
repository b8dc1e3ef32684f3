"""--stream: Hub to Hub shard by shard, at the HfApi boundary (model_info, hf_hub_download, create_repo,
preupload_lfs_files, create_commit patched on huggingface_hub.HfApi; range reads through
streamfold.hub.remote.read_range served from the same folder). A local HTTP Hub server would run the real
client code; none was in the tree when this was written."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import streamfold
from streamfold import cli
from streamfold.hub import remote as hub_remote

from .test_engine import BF16, RULES, write_safetensors
from .test_tasks import _files

REPO, DEST, COMMIT = "org/toy", "me/toy-FlashNorm", "c0ffee" * 6 + "c0ff"


@pytest.fixture(scope="module")
def layered(tmp_path_factory):
    """Four equal shards, one layer each (norm and consumers together)."""
    d = tmp_path_factory.mktemp("layered")
    rng = np.random.default_rng(5)
    H = 64
    wm = {}
    for n in range(4):
        t = {f"layers.{n}.norm.weight": rng.uniform(-0.5, 1, H).astype(BF16),
             f"layers.{n}.router.weight": rng.standard_normal((4, H)).astype(BF16),
             f"layers.{n}.experts.up": rng.standard_normal((2, H, 64)).astype(BF16),
             f"layers.{n}.experts.0.w1.weight": rng.standard_normal((600, H)).astype(BF16),
             f"layers.{n}.down.weight": rng.standard_normal((H, 300)).astype(BF16)}
        name = f"model-{n + 1:05d}-of-00004.safetensors"
        write_safetensors(d / name, t)
        wm.update(dict.fromkeys(t, name))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (d / "config.json").write_text(json.dumps({"model_type": "toymoe"}))
    (d / "tokenizer.json").write_text('{"v": 1}')
    (d / "pytorch_model.bin").write_bytes(b"unfolded")  # never downloaded
    return d


class StreamHub:
    def __init__(self, monkeypatch, folder: Path, fail_upload_at: int | None = None):
        import huggingface_hub
        self.folder, self.calls, self.uploaded, self.committed = folder, [], {}, None
        self.disk_at_upload: list[int] = []
        me = self

        def model_info(api, repo_id, revision=None, files_metadata=False, **kw):
            assert repo_id == REPO
            me.calls.append("model_info")
            return SimpleNamespace(sha=COMMIT, siblings=[
                SimpleNamespace(rfilename=p.name, size=p.stat().st_size) for p in sorted(folder.iterdir())])

        def hf_hub_download(api, repo_id, filename, revision=None, local_dir=None, **kw):
            assert revision == COMMIT and local_dir is not None
            assert not filename.endswith(".bin")
            me.calls.append(f"download {filename}")
            out = Path(local_dir) / filename
            out.write_bytes((folder / filename).read_bytes())
            return str(out)

        def create_repo(api, repo_id, **kw):
            me.calls.append("create_repo")
            return f"https://huggingface.co/{repo_id}"

        def preupload_lfs_files(api, repo_id, additions, **kw):
            for op in additions:
                if fail_upload_at is not None and len(me.uploaded) == fail_upload_at:
                    raise OSError("upload refused")
                me.uploaded[op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()
                op._is_uploaded = True
                me.calls.append(f"preupload {op.path_in_repo}")

        def create_commit(api, repo_id, operations, commit_message, **kw):
            me.calls.append("create_commit")
            files = {}
            for op in operations:
                if op._is_uploaded:
                    files[op.path_in_repo] = me.uploaded[op.path_in_repo]
                else:
                    src = op.path_or_fileobj
                    files[op.path_in_repo] = src if isinstance(src, bytes) else Path(src).read_bytes()
            me.committed = (repo_id, commit_message, files)
            return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/1")

        for name, fn in (("model_info", model_info), ("hf_hub_download", hf_hub_download),
                         ("create_repo", create_repo), ("preupload_lfs_files", preupload_lfs_files),
                         ("create_commit", create_commit)):
            monkeypatch.setattr(huggingface_hub.HfApi, name, fn)
        for other in ("snapshot_download", "upload_folder", "upload_file"):
            monkeypatch.setattr(huggingface_hub.HfApi, other, lambda *a, **k: pytest.fail("unexpected call"))

        def read_range(repo_id, filename, commit, start, end, token=None):
            assert repo_id == REPO and commit == COMMIT
            me.calls.append(f"range {filename} {start}-{end}")
            with open(folder / filename, "rb") as f:
                f.seek(start)
                return f.read(end - start)
        monkeypatch.setattr(hub_remote, "read_range", read_range)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")


def test_stream_uploads_what_convert_writes_one_shard_at_a_time(layered, tmp_path, monkeypatch, capsys):
    ref = tmp_path / "ref"
    streamfold.convert(layered, ref, rules=RULES, manifest=True)
    fake = StreamHub(monkeypatch, layered)
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"families": RULES}))
    dst = tmp_path / "small"
    assert cli.main([REPO, str(dst), "--push-to-hub", DEST, "--stream", "--verify", "--manifest",
                     "--rules", str(rules)]) == 0
    out = capsys.readouterr().out
    assert "streamed shard by shard: peak local disk" in out and f"pushed to https://huggingface.co/{DEST}" in out
    repo_id, msg, files = fake.committed
    assert repo_id == DEST and fake.calls.count("create_commit") == 1 and fake.calls[-1] == "create_commit"
    want = _files(ref)
    # the card names the Hub source and the push target (not the local folder): it and its manifest line differ
    def strip(fs):
        fs = {k: v for k, v in fs.items() if k != "README.md"}
        fs["SHA256SUMS"] = b"".join(x for x in fs["SHA256SUMS"].splitlines(True) if not x.endswith(b"  README.md\n"))
        return fs
    assert strip(files) == strip(want)
    assert f"base_model: {REPO}" in files["README.md"].decode()
    # shard by shard: each source shard is downloaded only after the previous output was uploaded
    order = [c for c in fake.calls if c.startswith(("download model-", "preupload model-"))]
    assert order == [f"{verb} model-{n:05d}-of-00004.safetensors" for n in range(1, 5)
                     for verb in ("download", "preupload")]
    # no weights were downloaded to plan: headers and norm vectors came by range requests
    assert fake.calls.index("download model-00001-of-00004.safetensors") > max(
        i for i, c in enumerate(fake.calls) if c.startswith("range"))
    shard_bytes = max((layered / s).stat().st_size for s in files if s.endswith(".safetensors"))
    total = sum((layered / s).stat().st_size for s in files if s.endswith(".safetensors"))
    import re
    peak = float(re.search(r"peak local disk ([\d.]+) kB", out).group(1)) * 1e3
    assert peak < 2 * shard_bytes + 64 * 1024 < total  # about one source + one output shard, not the model
    assert sorted(p.name for p in dst.iterdir()) == sorted(k for k in want if not k.endswith(".safetensors"))
    assert not list(tmp_path.glob(".*"))  # no work folder left


def test_stream_commits_nothing_when_an_upload_fails(layered, tmp_path, monkeypatch):
    fake = StreamHub(monkeypatch, layered, fail_upload_at=2)
    with pytest.raises(streamfold.StreamfoldError, match="uploading model-00003-of-00004.safetensors"):
        streamfold.convert(REPO, tmp_path / "o", rules=RULES, push_to_hub=DEST, stream=True)
    assert "create_commit" not in fake.calls and fake.committed is None
    assert not list(tmp_path.glob(".*"))


def test_stream_commits_nothing_when_verify_fails(layered, tmp_path, monkeypatch):
    from streamfold.run import engine
    real = engine.scale_chunk

    def wrong(src, mult, sd, od, out, s):  # one element off by one ulp in every folded chunk
        real(src, mult, sd, od, out, s)
        out.view(np.uint16).reshape(-1)[0] ^= 1
    monkeypatch.setattr(engine, "scale_chunk", wrong)
    fake = StreamHub(monkeypatch, layered)
    with pytest.raises(streamfold.StreamfoldError, match="verification of model-00001-of-00004.safetensors failed"):
        streamfold.convert(REPO, tmp_path / "o", rules=RULES, push_to_hub=DEST, stream=True, verify=True)
    assert "create_commit" not in fake.calls and not any(c.startswith("preupload") for c in fake.calls)
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"families": RULES}))
    assert cli.main([REPO, str(tmp_path / "o"), "--push-to-hub", DEST, "--stream", "--verify", "--rules",
                     str(rules), "-q"]) == 3  # a verification failure, as for convert --verify


def test_stream_needs_a_repo_and_a_target(layered, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    with pytest.raises(streamfold.StreamfoldError, match="--stream converts Hub to Hub"):
        streamfold.convert(REPO, tmp_path / "o", stream=True)
    with pytest.raises(streamfold.StreamfoldError, match="not a local folder"):
        streamfold.convert(layered, tmp_path / "o", stream=True, push_to_hub=DEST)


# --- over real HTTP: the real huggingface_hub client against tests/hubserver.py ---------------------------
from tests.hubserver import hub_server  # noqa: E402,F401  (a fixture)


def test_stream_over_http_commits_once_what_convert_writes(layered, tmp_path, hub_server):  # noqa: F811
    hub_server.add_repo(REPO, layered)
    ref = tmp_path / "ref" / "small"  # the same folder name: the card names it
    streamfold.convert(layered, ref, rules=RULES, manifest=True)
    before = len(hub_server.requests)
    report = streamfold.convert(REPO, tmp_path / "small", rules=RULES, push_to_hub=DEST, stream=True,
                                manifest=True, verify=True)
    commits = hub_server.commits(DEST)
    assert len(commits) == 2 and commits[-1].message.startswith("FlashNorm (compat) conversion of org/toy")
    got = hub_server.files(DEST)
    want = _files(ref)
    strip = lambda fs: {k: v for k, v in fs.items() if k not in ("README.md", "SHA256SUMS", ".gitattributes")}  # noqa: E731
    assert strip(got) == strip(want)
    assert got["SHA256SUMS"].splitlines()[1:] == want["SHA256SUMS"].splitlines()[1:]  # all but README's line
    reqs = hub_server.requests[before:]
    shard_gets = [r for r in reqs if r.method == "GET" and "/resolve/" in r.path and r.path.endswith(".safetensors")]
    full = [r for r in shard_gets if "range" not in r.headers]
    ranged = [r for r in shard_gets if "range" in r.headers]
    assert len(full) == 4 and len(ranged) >= 8  # each shard downloaded once; headers + norm vectors by Range
    assert not any(r.path.endswith(".bin") for r in reqs)
    shard = max((layered / s).stat().st_size for s in got if s.endswith(".safetensors"))
    assert report.peak_disk < 2 * shard + 64 * 1024
