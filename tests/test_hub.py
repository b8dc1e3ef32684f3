"""Hub-native paths: repo ids in (from a locally populated huggingface_hub cache, offline, and online
from tests/hubserver.py, a local Hub the real huggingface_hub client talks HTTP to), remote header-only
plans (Range reads), and pushes (create_repo, preupload, LFS upload, one commit). Nothing is patched at
the HfApi boundary: every online test runs the client's own code over HTTP. Xet storage is the one
protocol not served locally; the tests that let the client use Xet check what happens when it fails.

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
from pathlib import Path

import pytest

import streamfold
from streamfold import cli
from streamfold.hub import client as hub
from streamfold.hub import push as hub_push
from streamfold.hub import remote as hub_remote
from tests.hubserver import GITATTRIBUTES, hub_server  # noqa: F401  (hub_server is a fixture)
from tests.representatives import matrix

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


@pytest.mark.full
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


@pytest.mark.parametrize("src", matrix(["./no-such-dir", "a/b/c", "no such", "org/..x"], {"a/b/c"}))
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


# --- online: the real huggingface_hub client over HTTP, against tests/hubserver.py ----------------

def _resolve_gets(server, repo_id: str = REPO) -> list[str]:
    """The files fetched whole (GET resolve without a Range header)."""
    prefix = f"/{repo_id}/resolve/"
    return sorted(r.path.split("/", 5)[5] for r in server.requests
                  if r.method == "GET" and r.path.startswith(prefix) and "range" not in r.headers)


def _refs(hf_home: Path, repo_id: str = REPO) -> dict[str, str]:
    refs = hf_home / "hub" / ("models--" + repo_id.replace("/", "--")) / "refs"
    return {p.name: p.read_text() for p in refs.iterdir()} if refs.is_dir() else {}


def test_online_download_fetches_only_needed_files(tmp_path, hub_server, local_reference):
    sha = hub_server.add_repo(REPO, _files())
    report = streamfold.convert(REPO, tmp_path / "out", revision="main")
    assert _resolve_gets(hub_server) == sorted(NEEDED)  # no decoy is fetched, not even its first bytes
    touched = {r.path for r in hub_server.requests if "/resolve/" in r.path}
    assert not any(p.endswith(d) for p in touched for d in DECOYS if d != ".gitattributes")
    # everything after the revision is resolved is pinned to the commit
    assert all(f"/resolve/{sha}/" in p for p in touched)
    assert report.src == REPO and report.source_commit == sha
    assert sorted(report.skipped_files) == sorted(LISTED_DECOYS)
    out = tree(tmp_path / "out")
    assert output_files(tmp_path / "out") == sorted(NEEDED)
    ref = tree(local_reference)
    assert all(out[s] == ref[s] for s in [*SHARDS, "model.safetensors.index.json", "config.json"])


def test_convert_online_then_offline_from_the_same_cache(tmp_path, hub_server):
    """The bug of issue 13: the cache must learn which commit `main` is, or offline runs cannot find it."""
    sha = hub_server.add_repo(REPO, _files())
    r = run_cli(REPO, tmp_path / "online" / "out", "--json", env=hub_server.env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["source_commit"] == sha
    assert _refs(hub_server.hf_home) == {"main": sha}
    n = len(hub_server.requests)
    offline = hub_server.offline_env()
    r = run_cli(REPO, tmp_path / "offline" / "out", "--json", env=offline)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["source_commit"] == sha
    assert tree(tmp_path / "offline" / "out") == tree(tmp_path / "online" / "out")
    r = run_cli("inspect", REPO, "--json", env=offline)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["source"] == {"src": REPO, "how": "cache", "repo_id": REPO, "commit": sha}
    assert len(hub_server.requests) == n  # offline: not one request


def test_tag_revision_is_recorded_and_converts_offline(tmp_path, hub_server):
    v1 = hub_server.add_repo(REPO, _files(), tags=("v1",))
    files = _files()
    files["README.md"] = SOURCE_CARD.replace("apache-2.0", "mit").encode()
    main = hub_server.add_commit(REPO, files, message="relicense")
    for rev, sha, lic in (("v1", v1, "apache-2.0"), (None, main, "mit")):
        dst = tmp_path / f"on-{rev}"
        assert run_cli(REPO, dst, *(["--revision", rev] if rev else []), env=hub_server.env).returncode == 0
    assert _refs(hub_server.hf_home) == {"main": main, "v1": v1}
    for rev, sha, lic in (("v1", v1, "apache-2.0"), (None, main, "mit")):
        dst = tmp_path / f"off-{rev}"
        r = run_cli(REPO, dst, "--json", *(["--revision", rev] if rev else []), env=hub_server.offline_env())
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["source_commit"] == sha
        assert f"license: {lic}" in (dst / "README.md").read_text()


def test_unreachable_hub_falls_back_to_the_cache(tmp_path, hub_server):
    sha = hub_server.add_repo(REPO, _files())
    hub_server.add_repo("tiny-org/never-downloaded", _files())
    first = streamfold.convert(REPO, tmp_path / "first" / "out")
    hub_server.stop()  # connection refused from now on
    again = streamfold.convert(REPO, tmp_path / "again" / "out")
    assert again.source_commit == sha == first.source_commit
    assert tree(tmp_path / "again" / "out") == tree(tmp_path / "first" / "out")
    found = streamfold.inspect(REPO)
    assert found.how == "cache" and found.source.commit == sha and found.bytes_in == first.bytes_in
    with pytest.raises(streamfold.StreamfoldError) as info:
        streamfold.convert("tiny-org/never-downloaded", tmp_path / "never")
    msg = str(info.value)
    assert "\n" not in msg and "cannot reach the Hub" in msg and "not (completely) in the local cache" in msg
    # and from the CLI, quiet: nothing on stderr (huggingface_hub's own warning is silenced too)
    r = run_cli(REPO, tmp_path / "cli", "-q", env=hub_server.env)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stderr


def test_online_repo_without_safetensors_is_refused(tmp_path, hub_server):
    hub_server.add_repo(REPO, {"config.json": b"{}", "pytorch_model.bin": b"\0pickle"})
    with pytest.raises(streamfold.StreamfoldError, match="no model.safetensors.*pytorch_model.bin"):
        streamfold.convert(REPO, tmp_path / "out")
    assert _resolve_gets(hub_server) == []
    assert not (tmp_path / "out").exists()


def test_hub_errors_are_one_line(tmp_path, hub_server):
    hub_server.add_repo(REPO, _files())
    hub_server.add_repo("tiny-org/gated", _files(), gated=True)
    hub_server.add_repo("tiny-org/private", _files(), private=True)
    cases = [("tiny-org/nope", None, "no such Hub repo"), (REPO, "v9", "revision 'v9' not found"),
             ("tiny-org/gated", None, "gated repo"), ("tiny-org/private", None, "no such Hub repo")]
    for repo_id, rev, expected in cases:
        r = run_cli(repo_id, tmp_path / "out", *(["--revision", rev] if rev else []),
                    env={k: v for k, v in hub_server.env.items() if k != "HF_TOKEN"})
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert repo_id in lines[0] and expected in lines[0], lines[0]
    assert f"{hub_server.url}/tiny-org/gated" in run_cli("tiny-org/gated", tmp_path / "o", env=hub_server.env).stderr
    assert not (tmp_path / "out").exists()


def test_quiet_download_prints_nothing(tmp_path, hub_server):
    hub_server.add_repo(REPO, _files())
    r = run_cli(REPO, tmp_path / "out", "-q", env=hub_server.env)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stderr
    r = run_cli(REPO, tmp_path / "out2", "--json", env=hub_server.env)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_card_links_name_the_configured_endpoint(tmp_path, hub_server):
    hub_server.add_repo(REPO, _files())
    streamfold.convert(REPO, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"]({hub_server.url}/{REPO})" in card
    assert "https://huggingface.co/" not in card


def test_gitattributes_is_not_reported_as_skipped(tmp_path, hub_server):
    """Every Hub repo has a .gitattributes (git metadata, not another weight format): it is neither
    copied nor listed under "not copied (other weight formats)"."""
    files = {name: (SAMPLE / name).read_bytes() for name in [*SHARDS, "model.safetensors.index.json", "config.json"]}
    files[".gitattributes"] = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    hub_server.add_repo(REPO, files)
    report = streamfold.convert(REPO, tmp_path / "out")
    assert ".gitattributes" not in report.skipped_files and ".gitattributes" not in report.copied_files
    assert not (tmp_path / "out" / ".gitattributes").exists()
    assert ".gitattributes" not in streamfold.inspect(REPO).describe()


# --- remote plans: headers only (Range reads) -----------------------------------------------------

@pytest.mark.parametrize("mode,merged", matrix([("compat", "source"), ("strict", "float32")], {("strict", "float32")}))
def test_remote_plan_matches_local_plan_and_sizes(tmp_path, hub_server, mode, merged):
    sha = hub_server.add_repo(REPO, _files())
    remote = streamfold.inspect(REPO, mode=mode, merged_dtype=merged)
    # headers only: config.json and the index whole, each shard through Range reads of its first bytes
    assert _resolve_gets(hub_server) == ["config.json", "model.safetensors.index.json"]
    ranged = sorted((r.path.rsplit("/", 1)[1], r.headers["range"]) for r in hub_server.requests
                    if r.method == "GET" and "range" in r.headers)
    assert ranged == [(s, "bytes=0-100000") for s in SHARDS]
    assert remote.how == "remote" and remote.source.commit == sha
    assert _refs(hub_server.hf_home) == {"main": sha}
    snap = tmp_path / "snap"
    for name, data in _files().items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_bytes(data)
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
    assert remote.download_bytes == sum(len(_files()[p]) for p in NEEDED)


def test_remote_header_larger_than_the_first_read(tmp_path, hub_server):
    """A safetensors header over 100 kB takes a second Range read (bytes=8-...): served as 206 too."""
    import numpy as np
    from safetensors.numpy import save
    cfg = json.loads((SAMPLE / "config.json").read_text())
    blob = save({f"extra.{i:05d}.weight": np.zeros(1, np.float32) for i in range(2000)} |
                {"model.norm.weight": np.ones(cfg["hidden_size"], np.float32)})
    hub_server.add_repo(REPO, {"config.json": (SAMPLE / "config.json").read_bytes(), "model.safetensors": blob})
    meta = __import__("huggingface_hub").HfApi().get_safetensors_metadata(REPO)
    assert len(meta.files_metadata["model.safetensors"].tensors) == 2001
    ranges = [r.headers.get("range") for r in hub_server.requests if r.method == "GET"]
    header_len = int.from_bytes(blob[:8], "little")
    assert header_len > 100000 and ranges == ["bytes=0-100000", f"bytes=8-{header_len + 7}"]


def test_inspect_cli_remote_and_plan_flag(hub_server, capsys):
    sha = hub_server.add_repo(REPO, _files())
    assert cli.main(["inspect", REPO]) == 0
    text = capsys.readouterr().out
    assert cli.main([REPO, "--plan", "--json", "--merged-dtype", "float32"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert f"source: {REPO} @ {sha[:12]} (remote safetensors headers; no weights downloaded)" in text
    assert "FOLD  model.layers.*.input_layernorm  x2" in text
    n = len(json.loads((SAMPLE / "model.safetensors.index.json").read_text())["weight_map"])
    assert f"sizes: {n} tensors in 3 shard(s)" in text and "not downloaded" in text
    assert data["source"] == {"src": REPO, "how": "remote", "repo_id": REPO, "commit": sha}
    assert data["sizes"]["bytes_out"] > data["sizes"]["bytes_in"]
    assert "pytorch_model.bin" in data["download"]["not_downloaded"]


def test_inspect_offline_uses_cache(hf_home):
    r = run_cli("inspect", REPO, "--json", env=offline_env(hf_home))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["source"]["how"] == "cache" and data["source"]["commit"] == COMMIT
    assert data["tensors"]["scale"] == 11


def test_header_only_plan_defers_layernorm_bias_decision():
    from streamfold.planning.planner import make_plan
    from streamfold.core.reader import TensorInfo
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


# --- push: create_repo, preupload, LFS upload and one commit, over HTTP -----------------------------

def _pushed(server, repo_id: str) -> list:
    """The commits a push made: all but the Hub's initial commit of a new repo."""
    commits = server.commits(repo_id)
    assert commits[0].message == "initial commit" and list(commits[0].files) == [".gitattributes"]
    return commits[1:]


def test_push_to_hub_cli(tmp_path, hub_server, capsys):
    dst = tmp_path / "out"
    assert cli.main([str(SAMPLE), str(dst), "--push-to-hub", "me/tiny-FlashNorm", "--private",
                     "--commit-message", "fold it"]) == 0
    out = capsys.readouterr().out
    assert f"pushed to {hub_server.url}/me/tiny-FlashNorm" in out
    (commit,) = _pushed(hub_server, "me/tiny-FlashNorm")  # one commit
    assert commit.message == "fold it" and hub_server.repos["me/tiny-FlashNorm"].private is True
    # the complete output, card included, is in that commit, byte for byte; the shards went through LFS
    pushed = hub_server.files("me/tiny-FlashNorm")
    assert pushed.pop(".gitattributes") == GITATTRIBUTES and pushed == tree(dst)
    assert all(commit.files[s].lfs for s in SHARDS) and not commit.files["config.json"].lfs
    puts = sorted(r.path.rsplit("/", 1)[1] for r in hub_server.requests if r.method == "PUT")
    assert puts == sorted(hashlib.sha256(tree(dst)[s]).hexdigest() for s in SHARDS)
    card = pushed["README.md"].decode()
    assert "\n# tiny-FlashNorm\n" in card and "model_id = 'me/tiny-FlashNorm'\n" in card
    assert "vllm serve me/tiny-FlashNorm" in card
    assert "--push-to-hub me/tiny-FlashNorm --private" in card


def test_push_again_is_one_more_commit(tmp_path, hub_server):
    streamfold.convert(SAMPLE, tmp_path / "a", push_to_hub="me/x")
    streamfold.convert(SAMPLE, tmp_path / "b", mode="strict", push_to_hub="me/x")
    first, second = _pushed(hub_server, "me/x")
    assert second.parent == first.sha
    assert {k: v for k, v in hub_server.files("me/x").items() if k != ".gitattributes"} == tree(tmp_path / "b")


def test_push_library_defaults(tmp_path, hub_server):
    report = streamfold.convert(SAMPLE, tmp_path / "out", mode="strict", push_to_hub="me/x")
    assert report.hub_url == f"{hub_server.url}/me/x"
    (commit,) = _pushed(hub_server, "me/x")
    assert hub_server.repos["me/x"].private is False  # public unless asked (or the org's default)
    assert commit.message == f"FlashNorm (strict) conversion of sample with streamfold {streamfold.__version__}"


def test_push_quiet_prints_only_url(tmp_path, hub_server):
    hub_server.add_repo(REPO, _files())
    r = run_cli(REPO, tmp_path / "out", "-q", "--push-to-hub", "me/x", env=hub_server.env)
    assert r.returncode == 0, r.stderr
    # nothing on stderr: huggingface_hub's download and upload progress bars are silenced too
    assert r.stdout == f"{hub_server.url}/me/x\n" and r.stderr == ""
    r = run_cli(REPO, tmp_path / "out2", "--json", "--push-to-hub", "me/y", env=hub_server.env)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert json.loads(r.stdout)["hub_url"] == f"{hub_server.url}/me/y"
    assert len(_pushed(hub_server, "me/x")) == len(_pushed(hub_server, "me/y")) == 1


def test_push_preflight_fails_before_converting(tmp_path, hub_server, monkeypatch, capsys):
    import huggingface_hub
    dst = tmp_path / "out"
    monkeypatch.delenv("HF_TOKEN")
    assert cli.main([str(SAMPLE), str(dst), "--push-to-hub", "me/x"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert cli.main([str(SAMPLE), str(dst), "--push-to-hub", "me/x"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for bad in (["--push-to-hub", "not a repo"], ["--private"], ["--commit-message", "m"], ["--base-model", "x y"]):
        assert cli.main([str(SAMPLE), str(dst), *bad]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
    assert hub_server.requests == [] and not dst.exists()


def test_failed_upload_of_one_file_leaves_no_commit(tmp_path, hub_server, capsys):
    """create_commit uploads every large file before the one commit: when one upload fails, the others
    are in storage but nothing refers to them, and the repo is as it was."""
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text('{"model_type": "an earlier push"}')
    hub_push.push_folder(tmp_path / "old", "me/x")
    before = hub_server.files("me/x")
    streamfold.convert(SAMPLE, tmp_path / "probe")  # what the push uploads: the same bytes
    new = {s: hashlib.sha256((tmp_path / "probe" / s).read_bytes()).hexdigest() for s in SHARDS}
    hub_server.fail("PUT", new[SHARDS[2]], 400)  # a 4xx: the client retries 5xx answers with backoff
    dst = tmp_path / "out"
    assert cli.main([str(SAMPLE), str(dst), "-q", "--push-to-hub", "me/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("streamfold: error: me/x: uploading: "), err
    assert f"hf upload me/x {dst} ." in err
    assert all(tree(dst)[s] == tree(tmp_path / "probe")[s] for s in SHARDS)  # the output is complete
    stored = set(hub_server.repos["me/x"].lfs)
    assert {new[SHARDS[0]], new[SHARDS[1]]} <= stored and new[SHARDS[2]] not in stored  # two went up
    assert len(_pushed(hub_server, "me/x")) == 1 and hub_server.files("me/x") == before  # no commit


def test_push_with_xet_on_a_hub_without_xet_leaves_no_commit(tmp_path, hub_server):
    """With hf_xet (the default install) large files go through Xet; when that fails, nothing is committed."""
    pytest.importorskip("hf_xet")
    hub_server.xet(True)
    with pytest.raises(streamfold.StreamfoldError, match="me/x: uploading: .*xet-write-token"):
        streamfold.convert(SAMPLE, tmp_path / "out", push_to_hub="me/x")
    assert _pushed(hub_server, "me/x") == []
    assert [p for p in hub_server.paths() if "/commit/" in p] == []


def test_push_of_many_files_is_one_commit_even_with_xet(tmp_path, hub_server):
    """upload_folder, with hf_xet installed, commits a folder in batches of 250 files (each a commit);
    push_folder makes one commit whatever the count. Small text files are regular git files: no Xet
    storage is needed to serve them, so the Xet code path of the client runs here as it does for real."""
    pytest.importorskip("hf_xet")
    hub_server.xet(True)
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(300):
        (folder / f"f{i:03d}.json").write_text(json.dumps({"i": i}))
    hub_push.push_folder(folder, "me/many", token=None)
    (commit,) = _pushed(hub_server, "me/many")
    assert len(commit.files) == 301
    # the hazard this rules out, in the installed client:
    import huggingface_hub
    huggingface_hub.HfApi().create_repo("me/many2")
    huggingface_hub.HfApi().upload_folder(repo_id="me/many2", folder_path=str(folder))
    assert len(_pushed(hub_server, "me/many2")) > 1


def test_preupload_then_one_commit_with_objects_on_disk(tmp_path, monkeypatch):
    """The pre-upload API (what bounded-disk streaming builds on): files uploaded one by one with
    preupload_lfs_files, each deletable locally once uploaded, then one commit naming them all. The
    server streams uploads to disk here (HubServer(storage=...))."""
    import huggingface_hub
    from tests.hubserver import HubServer, point_client_at
    server = HubServer(storage=tmp_path / "store").start()
    try:
        point_client_at(monkeypatch, server.url, tmp_path / "hf", token=server.token)
        api = huggingface_hub.HfApi()
        api.create_repo("me/streamed")
        ops = []
        for shard in SHARDS:
            local = tmp_path / shard
            local.write_bytes((SAMPLE / shard).read_bytes())
            op = huggingface_hub.CommitOperationAdd(path_in_repo=shard, path_or_fileobj=str(local))
            api.preupload_lfs_files("me/streamed", additions=[op])
            local.unlink()  # uploaded: the local copy is no longer needed
            ops.append(op)
            assert len(server.commits("me/streamed")) == 1  # nothing committed yet
        ops.append(huggingface_hub.CommitOperationAdd(path_in_repo="config.json",
                                                      path_or_fileobj=(SAMPLE / "config.json").read_bytes()))
        api.create_commit("me/streamed", operations=ops, commit_message="all shards")
        initial, commit = server.commits("me/streamed")
        assert commit.message == "all shards" and commit.parent == initial.sha
        files = server.files("me/streamed")
        assert all(files[s] == (SAMPLE / s).read_bytes() for s in SHARDS)
        assert sorted(p.name for p in (tmp_path / "store" / "lfs").iterdir()) == \
            sorted(hashlib.sha256((SAMPLE / s).read_bytes()).hexdigest() for s in SHARDS)
        # a commit naming an object that was never uploaded is refused, and commits nothing
        bogus = huggingface_hub.CommitOperationAdd(path_in_repo="x.safetensors", path_or_fileobj=b"\0" * 64)
        bogus._upload_mode, bogus._is_uploaded = "lfs", True  # pretend it was pre-uploaded
        with pytest.raises(huggingface_hub.errors.HfHubHTTPError, match="does not exist"):
            api.create_commit("me/streamed", operations=[bogus], commit_message="bogus")
        assert len(server.commits("me/streamed")) == 2
    finally:
        server.stop()


def test_sink_server_checks_uploads_keeps_only_oid_and_size_and_counts_traffic(tmp_path, monkeypatch):
    """HubServer(sink=True) (the Hub benchmark's server): a repo added from a folder is served from its
    files, uploads are checked against their sha256 and dropped, commits still name them by oid and size;
    ``traffic`` counts the bytes served (full and ranged) and uploaded."""
    import huggingface_hub
    from tests.hubserver import HubServer, point_client_at
    server = HubServer(sink=True).start()
    try:
        point_client_at(monkeypatch, server.url, tmp_path / "hf", token=server.token)
        src = tmp_path / "src"
        src.mkdir()
        for shard in SHARDS:
            shutil.copyfile(SAMPLE / shard, src / shard)
        server.add_repo("me/src", src)
        api = huggingface_hub.HfApi()
        got = Path(api.hf_hub_download("me/src", SHARDS[0], local_dir=str(tmp_path / "dl")))
        assert got.read_bytes() == (SAMPLE / SHARDS[0]).read_bytes()
        size0 = (SAMPLE / SHARDS[0]).stat().st_size
        assert server.traffic == {"served": size0, "uploaded": 0}
        assert hub_remote.read_range("me/src", SHARDS[1], "main", 8, 20) == (SAMPLE / SHARDS[1]).read_bytes()[8:20]
        assert server.traffic["served"] == size0 + 12
        api.create_repo("me/dst")
        ops = [huggingface_hub.CommitOperationAdd(path_in_repo=s, path_or_fileobj=str(src / s)) for s in SHARDS]
        api.create_commit("me/dst", operations=ops, commit_message="shards")
        tree = server.commits("me/dst")[-1].files
        for s in SHARDS:
            data = (SAMPLE / s).read_bytes()
            assert (tree[s].sha256, tree[s].size, tree[s].data, tree[s].path) == \
                (hashlib.sha256(data).hexdigest(), len(data), None, None)
        assert server.traffic["uploaded"] == sum((SAMPLE / s).stat().st_size for s in SHARDS)
        assert not list(tmp_path.glob("**/lfs"))  # nothing stored
        session = huggingface_hub.utils.get_session()
        r = session.get(f"{server.url}/me/dst/resolve/main/{SHARDS[0]}")
        assert r.status_code == 410 and "sink" in r.headers["X-Error-Message"]
        with pytest.raises(ValueError, match="sink"):
            server.files("me/dst")
        # an upload whose bytes do not match its oid is refused, also by a sink
        r = session.put(f"{server.url}/_lfs/me/dst/{'0' * 64}", content=b"x" * 10)
        assert r.status_code == 400 and "does not match" in r.text
    finally:
        server.stop()


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
