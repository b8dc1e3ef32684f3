"""Hub-native paths: repo ids in (from a locally populated huggingface_hub cache, offline), remote
header-only plans, and pushes (intercepted at the HfApi boundary: the public Hub is not reachable here).

The cache fixture lays the bundled sample checkpoint out exactly as huggingface_hub stores downloads
(``$HF_HOME/hub/models--org--name/{blobs,snapshots/<commit>,refs/main}``), plus decoys a real repo has:
PyTorch/Flax/ONNX duplicates, Mistral-style ``consolidated.*`` files and Meta's ``original/`` folder.
Converting from it must use none of them.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from fnmatch import fnmatchcase
from pathlib import Path
from types import SimpleNamespace

import pytest

import streamfold
from streamfold import cli, hub

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "streamfold" / "sample"
REPO = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
COMMIT_V1 = "fedcba9876543210fedcba9876543210fedcba98"
SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
SOURCE_CARD = """---
license: apache-2.0
language:
- en
base_model: tiny-org/tiny-llama-base
pipeline_tag: text-generation
tags:
- onnx
- transformers.js
---
# tiny-llama

SOURCE-CARD-BODY: this text must not reach the converted checkpoint's card.
"""
# The files a conversion needs, and the decoys that must never be downloaded, used or copied.
NEEDED = [*SHARDS, "model.safetensors.index.json", "config.json", "generation_config.json",
          "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "LICENSE", "README.md"]
DECOYS = ["pytorch_model.bin", "pytorch_model.bin.index.json.bin", "flax_model.msgpack", "model.pth",
          "consolidated.safetensors", "consolidated.00.pth", "original/consolidated.00.pth",
          "original/params.json", "original/tokenizer.model", "onnx/model.onnx", "model-extra.safetensors",
          ".gitattributes"]
LISTED_DECOYS = [d for d in DECOYS if not d.startswith(".")]  # hidden files are skipped silently


def _files() -> dict[str, bytes]:
    files = {name: (SAMPLE / name).read_bytes() for name in [*SHARDS, "model.safetensors.index.json",
                                                             "config.json", "generation_config.json"]}
    files.update({
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE"}}).encode(),
        "tokenizer_config.json": b'{"model_max_length": 256}',
        "special_tokens_map.json": b'{"bos_token": "<s>"}',
        "LICENSE": b"Apache License 2.0 (test fixture)\n",
        "README.md": SOURCE_CARD.encode(),
    })
    shard = (SAMPLE / SHARDS[0]).read_bytes()
    for d in DECOYS:
        files[d] = shard if d.endswith(".safetensors") else f"decoy {d}\n".encode() * 64
    return files


def populate_cache(hf_home: Path, repo_id: str = REPO, files: dict[str, bytes] | None = None,
                   commit: str = COMMIT, refs: tuple[str, ...] = ("main",)) -> Path:
    """Lay ``files`` out as huggingface_hub's cache does; returns the snapshot folder."""
    files = _files() if files is None else files
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    for rel, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snap


def offline_env(hf_home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update({"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
                # were anything to try the network anyway, it would fail fast instead of reaching the Hub
                "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_DISABLE_TELEMETRY": "1"})
    env.update(extra)
    return env


def run_cli(*args, env, cwd=None):
    return subprocess.run([sys.executable, "-m", "streamfold", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def output_files(root: Path) -> list[str]:
    """The output's files, less the SHA256SUMS manifest (which, when written, must cover the card too)."""
    names = sorted(tree(root))
    if "SHA256SUMS" in names:
        assert "README.md" in (root / "SHA256SUMS").read_text()
        names.remove("SHA256SUMS")
    return names


@pytest.fixture
def hf_home(tmp_path):
    home = tmp_path / "hf"
    populate_cache(home)
    return home


@pytest.fixture
def local_reference(tmp_path):
    """The same checkpoint converted from a plain local folder (no Hub involved)."""
    src = tmp_path / "plain"
    shutil.copytree(SAMPLE, src)
    out = tmp_path / "plain-out"
    streamfold.convert(src, out)
    return out


# --- repo ids from the cache, offline -------------------------------------------------------------

def test_convert_repo_id_offline_from_cache(tmp_path, hf_home, local_reference):
    snap = hf_home / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
    cache_before = tree(snap)
    dst = tmp_path / "out"
    r = run_cli(REPO, dst, "--json", env=offline_env(hf_home))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["src"] == REPO and report["source_commit"] == COMMIT
    out = tree(dst)
    # exactly the needed files; the source card is replaced by streamfold's
    assert output_files(dst) == sorted(NEEDED)
    for d in DECOYS:
        assert d not in out and d not in report["copied_files"]
    assert set(report["skipped_files"]) == set(LISTED_DECOYS)
    # the weights and index are exactly what a local conversion of the same checkpoint writes
    ref = tree(local_reference)
    for name in [*SHARDS, "model.safetensors.index.json", "config.json"]:
        assert out[name] == ref[name], name
    for name in ("tokenizer.json", "LICENSE", "generation_config.json"):
        assert out[name] == cache_before[name]
    assert b"SOURCE-CARD-BODY" not in out["README.md"]
    import yaml
    text = out["README.md"].decode()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == REPO and meta["base_model_relation"] == "finetune"
    assert meta["license"] == "apache-2.0" and "flashnorm" in meta["tags"]
    assert f"(commit `{COMMIT[:12]}`)" in text
    assert json.loads(out["config.json"])["flashnorm"] is True
    assert tree(snap) == cache_before  # the cache is read, never written


def test_offline_empty_cache_is_one_line_error(tmp_path):
    empty = tmp_path / "empty-hf"
    empty.mkdir()
    dst = tmp_path / "out"
    r = run_cli(REPO, dst, env=offline_env(empty))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert REPO in lines[0] and "not in the local Hugging Face cache" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert not dst.exists()


def test_offline_missing_shard_is_one_line_error(tmp_path):
    home = tmp_path / "hf"
    files = _files()
    del files[SHARDS[1]]
    populate_cache(home, files=files)
    r = run_cli(REPO, tmp_path / "out", env=offline_env(home))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1
    assert SHARDS[1] in r.stderr and "HF_HUB_OFFLINE" in r.stderr
    assert not (tmp_path / "out").exists()


def test_revision_tag_and_commit_resolve_from_cache(tmp_path, hf_home):
    files = _files()
    files["README.md"] = SOURCE_CARD.replace("apache-2.0", "mit").encode()
    populate_cache(hf_home, files=files, commit=COMMIT_V1, refs=("v1",))
    env = offline_env(hf_home)
    for rev, commit, lic in (("v1", COMMIT_V1, "mit"), (COMMIT, COMMIT, "apache-2.0"), (None, COMMIT, "apache-2.0")):
        dst = tmp_path / f"out-{rev}"
        r = run_cli(REPO, dst, "--json", *(["--revision", rev] if rev else []), env=env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["source_commit"] == commit
        assert f"license: {lic}" in (dst / "README.md").read_text()
    r = run_cli(REPO, tmp_path / "out-x", "--revision", "nope", env=env)
    assert r.returncode == 2 and "HF_HUB_OFFLINE" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_local_path_wins_over_repo_id(tmp_path):
    cwd = tmp_path / "work"
    shutil.copytree(SAMPLE, cwd / "tiny-org" / "tiny-llama")
    empty = tmp_path / "empty-hf"
    empty.mkdir()
    r = run_cli(REPO, "out", "--json", env=offline_env(empty), cwd=cwd)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["src"] == REPO and report["source_commit"] is None
    assert (cwd / "out" / SHARDS[0]).is_file()
    r = run_cli(REPO, "out2", "--revision", "main", env=offline_env(empty), cwd=cwd)
    assert r.returncode == 2 and "--revision applies to Hub repo ids" in r.stderr


@pytest.mark.parametrize("src", ["./no-such-dir", "a/b/c", "no such", "org/..x"])
def test_neither_path_nor_repo_id(tmp_path, src):
    r = run_cli(src, tmp_path / "out", env=offline_env(tmp_path / "hf"), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert src in r.stderr and "not a Hub repo id" in r.stderr


def test_local_conversion_does_not_import_huggingface_hub(tmp_path):
    code = ("import sys, streamfold; streamfold.convert(sys.argv[1], sys.argv[2]);"
            "print('huggingface_hub' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(SAMPLE), str(tmp_path / "out")], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


# --- which files are downloaded online ------------------------------------------------------------

LLAMA_LISTING = [".gitattributes", "LICENSE.txt", "README.md", "USE_POLICY.md", "config.json",
                 "generation_config.json", "model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors",
                 "model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors",
                 "model.safetensors.index.json", "original/consolidated.00.pth", "original/params.json",
                 "original/tokenizer.model", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
MISTRAL_LISTING = [".gitattributes", "README.md", "config.json", "consolidated.safetensors",
                   "generation_config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                   "model.safetensors.index.json", "params.json", "pytorch_model-00001-of-00002.bin",
                   "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json", "tokenizer.json",
                   "tokenizer.model.v3", "tokenizer_config.json"]


@pytest.mark.parametrize("listing,shards,expected", [
    (LLAMA_LISTING, [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)],
     ["LICENSE.txt", "README.md", "USE_POLICY.md", "config.json", "generation_config.json",
      *[f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)], "model.safetensors.index.json",
      "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]),
    (MISTRAL_LISTING, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"],
     ["README.md", "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
      "model-00002-of-00002.safetensors", "model.safetensors.index.json", "params.json",
      "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer.model.v3", "tokenizer_config.json"]),
])
def test_select_files_real_listings(listing, shards, expected):
    take, skipped = hub.select_files(listing, shards)
    assert take == sorted(expected)
    assert sorted(take + skipped + [".gitattributes"]) == sorted(listing)  # hidden: in neither list
    for p in take:
        assert not p.endswith((".bin", ".pth")) and not p.split("/")[-1].startswith("consolidated.")
        assert not p.startswith("original/")


class FakeHub:
    """Serves a repo from a folder at the HfApi boundary, recording every call."""

    def __init__(self, monkeypatch, folder: Path, repo_id: str = REPO, commit: str = COMMIT):
        import huggingface_hub
        self.folder, self.repo_id, self.commit = folder, repo_id, commit
        self.calls: list[tuple[str, dict]] = []
        for name in ("model_info", "hf_hub_download", "snapshot_download", "get_safetensors_metadata",
                     "create_repo", "upload_folder", "create_commit", "repo_info"):
            monkeypatch.setattr(huggingface_hub.HfApi, name, self._make(name))
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def _make(self, name):
        def method(api, *args, **kwargs):
            self.calls.append((name, {"args": args, **kwargs}))
            return getattr(self, name)(*args, **kwargs)
        return method

    def names(self):
        return [c[0] for c in self.calls]

    def listing(self):
        return sorted(p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*") if p.is_file())

    def model_info(self, repo_id, revision=None, files_metadata=False, **kw):
        assert repo_id == self.repo_id
        siblings = [SimpleNamespace(rfilename=p, size=(self.folder / p).stat().st_size if files_metadata else None)
                    for p in self.listing()]
        return SimpleNamespace(sha=self.commit, siblings=siblings)

    def hf_hub_download(self, repo_id, filename, revision=None, **kw):
        assert revision == self.commit, "downloads must be pinned to the resolved commit"
        return str(self.folder / filename)

    def snapshot_download(self, repo_id, revision=None, allow_patterns=None, ignore_patterns=None, **kw):
        assert revision == self.commit
        self.downloaded = [p for p in self.listing()
                           if allow_patterns is None or any(fnmatchcase(p, pat) for pat in allow_patterns)]
        return str(self.folder)

    def get_safetensors_metadata(self, repo_id, revision=None, **kw):
        raise AssertionError("not expected")

    def create_repo(self, repo_id, **kw):
        raise AssertionError("not expected")

    upload_folder = create_commit = repo_info = create_repo


def test_online_download_fetches_only_needed_files(tmp_path, hf_home, local_reference):
    snap = hf_home / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
    mp = pytest.MonkeyPatch()
    try:
        fake = FakeHub(mp, snap)
        report = streamfold.convert(REPO, tmp_path / "out", revision="main")
    finally:
        mp.undo()
    assert fake.names() == ["model_info", "hf_hub_download", "snapshot_download"]
    assert fake.calls[0][1]["revision"] == "main"
    assert sorted(fake.downloaded) == sorted(NEEDED)
    assert report.src == REPO and report.source_commit == COMMIT
    assert sorted(report.skipped_files) == sorted(LISTED_DECOYS)
    out = tree(tmp_path / "out")
    assert output_files(tmp_path / "out") == sorted(NEEDED)
    assert all(out[s] == tree(local_reference)[s] for s in SHARDS)


def test_online_repo_without_safetensors_is_refused(tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"x")
    mp = pytest.MonkeyPatch()
    try:
        fake = FakeHub(mp, folder)
        with pytest.raises(streamfold.StreamfoldError, match="no model.safetensors.*pytorch_model.bin"):
            streamfold.convert(REPO, tmp_path / "out")
    finally:
        mp.undo()
    assert "snapshot_download" not in fake.names()
    assert not (tmp_path / "out").exists()


def test_hub_errors_are_one_line(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def boom(exc):
        def method(api, *a, **k):
            raise exc
        return method
    resp = SimpleNamespace(status_code=404, headers={}, url="https://huggingface.co/api/models/x",
                           request=None, text="")
    cases = [
        (errors.RepositoryNotFoundError("404 Client Error. Repository Not Found", response=resp),
         "no such Hub repo"),
        (errors.GatedRepoError("403 gated", response=resp), "gated repo"),
        (errors.RevisionNotFoundError("404 revision", response=resp), "revision"),
        (ConnectionError("Connection refused"), "cannot reach the Hub"),
    ]
    for exc, expected in cases:
        monkeypatch.setattr(huggingface_hub.HfApi, "model_info", boom(exc))
        with pytest.raises(streamfold.StreamfoldError) as info:
            streamfold.convert(REPO, tmp_path / "out", revision="v9")
        msg = str(info.value)
        assert "\n" not in msg and REPO in msg and expected in msg, msg


# --- remote plans: headers only -------------------------------------------------------------------

def _remote_metadata(folder: Path):
    """What HfApi.get_safetensors_metadata returns, built from real headers with huggingface_hub's types."""
    from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo
    from streamfold.reader import SafetensorsFile
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = {}
    for shard in sorted(set(index["weight_map"].values())):
        f = SafetensorsFile(folder / shard)
        files[shard] = SafetensorsFileMetadata(
            metadata=f.metadata or {},
            tensors={n: TensorInfo(dtype=t.dtype, shape=list(t.shape),
                                   data_offsets=(t.begin - f.header_size, t.end - f.header_size))
                     for n, t in f.tensors.items()})
    return SafetensorsRepoMetadata(metadata=index.get("metadata"), sharded=True, weight_map=index["weight_map"],
                                   files_metadata=files)


class RemoteHub(FakeHub):
    def hf_hub_download(self, repo_id, filename, revision=None, **kw):
        assert filename == "config.json", f"only config.json may be downloaded, not {filename}"
        return super().hf_hub_download(repo_id, filename, revision=revision)

    def snapshot_download(self, *a, **kw):
        raise AssertionError("a remote plan must not download the snapshot")

    def get_safetensors_metadata(self, repo_id, revision=None, **kw):
        assert revision == self.commit
        return _remote_metadata(self.folder)


@pytest.mark.parametrize("mode,merged", [("compat", "source"), ("strict", "float32")])
def test_remote_plan_matches_local_plan_and_sizes(tmp_path, hf_home, mode, merged):
    snap = hf_home / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
    mp = pytest.MonkeyPatch()
    try:
        fake = RemoteHub(mp, snap)
        remote = streamfold.inspect(REPO, mode=mode, merged_dtype=merged)
    finally:
        mp.undo()
    assert fake.names() == ["model_info", "hf_hub_download", "get_safetensors_metadata"]
    assert remote.how == "remote" and remote.source.commit == COMMIT
    local = streamfold.inspect(snap, mode=mode, merged_dtype=merged)
    assert local.how == "local"
    r, l = remote.to_dict(), local.to_dict()
    for key in ("family", "model_type", "mode", "merged_dtype", "norms", "tensors", "unknown_norms"):
        assert r[key] == l[key], key
    # the predicted sizes are what converting actually reads and writes
    report = streamfold.convert(snap, tmp_path / "out", mode=mode, merged_dtype=merged)
    assert remote.bytes_in == report.bytes_in and remote.bytes_out == report.bytes_out
    assert (remote.bytes_out > remote.bytes_in) == (merged == "float32")
    assert sorted(remote.download_files) == sorted(NEEDED)
    assert sorted(remote.skipped_files) == sorted(LISTED_DECOYS)
    assert remote.download_bytes == sum((snap / p).stat().st_size for p in NEEDED)


def test_inspect_cli_remote_and_plan_flag(tmp_path, hf_home, capsys):
    snap = hf_home / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
    mp = pytest.MonkeyPatch()
    try:
        RemoteHub(mp, snap)
        assert cli.main(["inspect", REPO]) == 0
        text = capsys.readouterr().out
        assert cli.main([REPO, "--plan", "--json", "--merged-dtype", "float32"]) == 0
        data = json.loads(capsys.readouterr().out)
    finally:
        mp.undo()
    assert f"source: {REPO} @ {COMMIT[:12]} (remote safetensors headers; no weights downloaded)" in text
    assert "FOLD  model.layers.*.input_layernorm  x2" in text
    n = len(json.loads((SAMPLE / "model.safetensors.index.json").read_text())["weight_map"])
    assert f"sizes: {n} tensors in 3 shard(s)" in text and "not downloaded" in text
    assert data["source"] == {"src": REPO, "how": "remote", "repo_id": REPO, "commit": COMMIT}
    assert data["sizes"]["bytes_out"] > data["sizes"]["bytes_in"]
    assert "pytorch_model.bin" in data["download"]["not_downloaded"]


def test_inspect_offline_uses_cache(hf_home):
    r = run_cli("inspect", REPO, "--json", env=offline_env(hf_home))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["source"]["how"] == "cache" and data["source"]["commit"] == COMMIT
    assert data["tensors"]["scale"] == 11


def test_header_only_plan_defers_layernorm_bias_decision():
    from streamfold.plan import make_plan
    from streamfold.reader import TensorInfo
    p = Path("shard.safetensors")
    t = {"ln.weight": TensorInfo("ln.weight", "F32", (4,), p, 0, 16),
         "ln.bias": TensorInfo("ln.bias", "F32", (4,), p, 16, 32),
         "fc.weight": TensorInfo("fc.weight", "F32", (3, 4), p, 32, 80)}
    rules = {"toy": {"model_types": ["toy"], "folds": [{"norm": "ln", "into": ["fc"]}]}}
    plan = make_plan({"model_type": "toy"}, t, None, rules=rules)
    (norm,) = plan.norms
    assert norm.status == "fold" and norm.scale is None
    assert "decided at conversion" in norm.reason
    assert plan.actions["fc.weight"].kind == "scale" and plan.actions["ln.weight"].kind == "fill"
    assert "bias fold decided at conversion" in plan.describe()


# --- push ------------------------------------------------------------------------------------------

class PushHub:
    def __init__(self, monkeypatch, fail_upload: Exception | None = None):
        import huggingface_hub
        from huggingface_hub.hf_api import RepoUrl
        self.calls = []
        self.uploaded: dict[str, bytes] = {}

        def create_repo(api, repo_id, **kw):
            self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(api, **kw):
            self.calls.append(("upload_folder", kw))
            if fail_upload is not None:
                raise fail_upload
            self.uploaded = tree(Path(kw["folder_path"]))
            return SimpleNamespace(commit_url=f"https://huggingface.co/{kw['repo_id']}/commit/abc123",
                                   oid="abc123")
        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        for other in ("create_commit", "upload_file"):
            monkeypatch.setattr(huggingface_hub.HfApi, other, lambda *a, **k: pytest.fail("unexpected call"))
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")


def test_push_to_hub_cli(tmp_path, monkeypatch, capsys):
    fake = PushHub(monkeypatch)
    dst = tmp_path / "out"
    assert cli.main([str(SAMPLE), str(dst), "--push-to-hub", "me/tiny-FlashNorm", "--private",
                     "--commit-message", "fold it"]) == 0
    out = capsys.readouterr().out
    assert [c[0] for c in fake.calls] == ["create_repo", "upload_folder"]
    create, upload = fake.calls[0][1], fake.calls[1][1]
    assert create["repo_id"] == "me/tiny-FlashNorm" and create["repo_type"] == "model"
    assert create["private"] is True and create["exist_ok"] is True
    assert upload["repo_id"] == "me/tiny-FlashNorm" and upload["repo_type"] == "model"
    assert Path(upload["folder_path"]) == dst and upload["commit_message"] == "fold it"
    assert "pushed to https://huggingface.co/me/tiny-FlashNorm" in out
    # the complete output, card included, was uploaded in that one commit
    assert fake.uploaded == tree(dst)
    card = fake.uploaded["README.md"].decode()
    assert "\n# tiny-FlashNorm\n" in card and "model_id = 'me/tiny-FlashNorm'\n" in card
    assert "vllm serve me/tiny-FlashNorm" in card
    assert "--push-to-hub me/tiny-FlashNorm --private" in card


def test_push_library_defaults(tmp_path, monkeypatch):
    fake = PushHub(monkeypatch)
    report = streamfold.convert(SAMPLE, tmp_path / "out", mode="strict", push_to_hub="me/x")
    assert report.hub_url == "https://huggingface.co/me/x"
    create, upload = fake.calls[0][1], fake.calls[1][1]
    assert create["private"] is None  # public unless asked (or the org's default)
    assert upload["commit_message"] == \
        f"FlashNorm (strict) conversion of sample with streamfold {streamfold.__version__}"


def test_push_quiet_prints_only_url(tmp_path, monkeypatch, capsys):
    PushHub(monkeypatch)
    assert cli.main([str(SAMPLE), str(tmp_path / "out"), "-q", "--push-to-hub", "me/x"]) == 0
    assert capsys.readouterr().out == "https://huggingface.co/me/x\n"


def test_push_preflight_fails_before_converting(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    fake = PushHub(monkeypatch)
    dst = tmp_path / "out"
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert cli.main([str(SAMPLE), str(dst), "--push-to-hub", "me/x"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert cli.main([str(SAMPLE), str(dst), "--push-to-hub", "me/x"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for bad in (["--push-to-hub", "not a repo"], ["--private"], ["--commit-message", "m"], ["--base-model", "x y"]):
        assert cli.main([str(SAMPLE), str(dst), *bad]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
    assert fake.calls == [] and not dst.exists()


def test_push_failure_keeps_output_and_says_how_to_retry(tmp_path, monkeypatch, capsys):
    fake = PushHub(monkeypatch, fail_upload=ConnectionError("connection reset"))
    dst = tmp_path / "out"
    assert cli.main([str(SAMPLE), str(dst), "--push-to-hub", "me/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "me/x" in err and f"hf upload me/x {dst} ." in err
    assert (dst / "README.md").is_file() and (dst / SHARDS[0]).is_file()
    assert [c[0] for c in fake.calls] == ["create_repo", "upload_folder"]


def test_help_documents_hub_usage():
    r = subprocess.run([sys.executable, "-m", "streamfold", "--help"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0
    for text in ("HuggingFaceTB/SmolLM2-135M", "--push-to-hub", "HF_HUB_OFFLINE", "HF_TOKEN", "HF_HOME",
                 "inspect meta-llama/Llama-3.2-1B", "model card"):
        assert text in r.stdout, text
    r = subprocess.run([sys.executable, "-m", "streamfold", "convert", "--help"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    for text in ("--revision", "--push-to-hub", "--private", "--commit-message", "--base-model"):
        assert text in r.stdout, text
