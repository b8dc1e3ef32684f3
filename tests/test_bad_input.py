"""Bad input: one-line error naming the file or tensor, non-zero exit, source untouched, no output."""
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from tests.representatives import matrix

SAMPLE = Path(__file__).resolve().parents[1] / "streamfold" / "sample"
SHARD1, SHARD2, SHARD3 = (f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "streamfold", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, "PYTHONPATH": str(SAMPLE.parents[1])})


def tree_hash(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    shutil.copytree(SAMPLE, d)
    return d


def header(path: Path) -> tuple[dict, int]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), n


def rewrite_header(path: Path, hdr: dict) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    data = raw[8 + n:]
    new = json.dumps(hdr).encode()
    new += b" " * (-(8 + len(new)) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + data)


def truncate(src):
    p = src / SHARD2
    p.write_bytes(p.read_bytes()[:-100])
    return SHARD2


def corrupt_header(src):
    p = src / SHARD2
    raw = bytearray(p.read_bytes())
    raw[10:14] = b"}}{{"
    p.write_bytes(bytes(raw))
    return SHARD2


def bad_offsets(src):
    p = src / SHARD2
    hdr, _ = header(p)
    name = "model.layers.0.self_attn.k_proj.weight"
    b, e = hdr[name]["data_offsets"]
    hdr[name]["data_offsets"] = [b + 2, e + 2]
    rewrite_header(p, hdr)
    return name


def missing_shard(src):
    (src / SHARD3).unlink()
    return SHARD3


def index_names_absent_tensor(src):
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.layers.0.mlp.extra_proj.weight"] = SHARD3
    (src / "model.safetensors.index.json").write_text(json.dumps(idx))
    return "model.layers.0.mlp.extra_proj.weight"


def missing_config(src):
    (src / "config.json").unlink()
    return "config.json"


def corrupt_config(src):
    (src / "config.json").write_text('{"model_type": "llama",')
    return "config.json"


def unknown_arch(src):
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "frobnicator"
    (src / "config.json").write_text(json.dumps(cfg))
    return "frobnicator"


def quantized(src):
    # a quantization_config over unquantized weights: the config and the weights disagree
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (src / "config.json").write_text(json.dumps(cfg))
    return "quantization_config"


def shape_mismatch(src):
    # same bytes, but the consumer now claims 32 input columns where its norm has 64 channels
    p = src / SHARD2
    hdr, _ = header(p)
    name = "model.layers.1.self_attn.q_proj.weight"
    hdr[name]["shape"] = [128, 32]
    rewrite_header(p, hdr)
    return name


def rewrite_header_text(path: Path, text: str) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    new = text.encode()
    new += b" " * (-(8 + len(new)) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def dtype_not_a_string(src):
    p = src / SHARD2
    hdr, _ = header(p)
    name = "model.layers.0.self_attn.k_proj.weight"
    hdr[name]["dtype"] = ["BF16"]  # unhashable: was a TypeError (internal error)
    rewrite_header(p, hdr)
    return name


def bool_shape_dimension(src):
    # [64, 128] -> [true, 64, 128]: the same element count (True == 1 in Python); o_proj is copied,
    # so nothing downstream looks at its shape and the `true` used to be written back
    p = src / SHARD2
    hdr, _ = header(p)
    name = "model.layers.0.self_attn.o_proj.weight"
    hdr[name]["shape"] = [True] + hdr[name]["shape"]
    rewrite_header(p, hdr)
    return name


def bool_offset(src):
    p = src / SHARD1
    hdr, _ = header(p)
    name = "model.layers.0.input_layernorm.weight"
    assert hdr[name]["data_offsets"][0] == 0
    hdr[name]["data_offsets"][0] = False  # False == 0
    rewrite_header(p, hdr)
    return name


def duplicate_header_key(src):
    # the same tensor listed twice (identical entries): json would silently keep the last
    p = src / SHARD2
    hdr, _ = header(p)
    name = "model.layers.0.self_attn.k_proj.weight"
    text = json.dumps(hdr)
    entry = json.dumps({name: hdr[name]})[1:-1]
    rewrite_header_text(p, text[:-1] + ", " + entry + "}")
    return name


def duplicate_index_key(src):
    path = src / "model.safetensors.index.json"
    idx = json.loads(path.read_text())
    name = "model.layers.0.self_attn.k_proj.weight"
    text = json.dumps(idx)
    entry = json.dumps({name: idx["weight_map"][name]})[1:-1]
    wm_start = text.index('"weight_map": {') + len('"weight_map": {')
    path.write_text(text[:wm_start] + entry + ", " + text[wm_start:])
    return name


def duplicate_config_key(src):
    path = src / "config.json"
    text = path.read_text().strip()
    path.write_text(text[:-1].rstrip() + ', "hidden_size": 64}')
    return "hidden_size"


FAULTS = [truncate, corrupt_header, bad_offsets, missing_shard, index_names_absent_tensor,
          missing_config, corrupt_config, unknown_arch, quantized, shape_mismatch,
          dtype_not_a_string, bool_shape_dimension, bool_offset, duplicate_header_key,
          duplicate_index_key, duplicate_config_key]


@pytest.mark.parametrize("fault", matrix(FAULTS, {truncate, corrupt_header, missing_shard, unknown_arch,
                                                   duplicate_config_key}), ids=[f.__name__ for f in FAULTS])
def test_bad_input_is_refused_cleanly(src, tmp_path, fault):
    needle = fault(src)
    before = tree_hash(src)
    dst = tmp_path / "out" / "dst"
    r = run_cli(src, dst)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("streamfold: error: ")
    assert needle in lines[0]
    assert "Traceback" not in r.stderr
    assert tree_hash(src) == before
    assert not dst.exists()
    assert not (dst.parent.exists() and any(dst.parent.iterdir()))  # no temp folder left behind


def test_existing_destination_is_refused(src, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    r = run_cli(src, dst)
    assert r.returncode == 2 and "--overwrite" in r.stderr and str(dst) in r.stderr
    assert (dst / "keep.txt").read_text() == "mine" and len(list(dst.iterdir())) == 1
    r = run_cli(src, dst, "--overwrite", "--quiet")
    assert r.returncode == 0, r.stderr
    assert not (dst / "keep.txt").exists() and (dst / "config.json").exists()


@pytest.mark.parametrize("where", ["same", "inside"])
def test_destination_in_source_is_refused(src, where):
    dst = src if where == "same" else src / "out"
    before = tree_hash(src)
    r = run_cli(src, dst)
    assert r.returncode == 2 and "inside" in r.stderr
    assert tree_hash(src) == before


def test_library_raises_streamfold_error(src, tmp_path):
    import streamfold
    truncate(src)
    with pytest.raises(streamfold.StreamfoldError, match=SHARD2):
        streamfold.convert(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


# --- hostile environments: permissions (as a non-root user: root ignores them) and closed pipes -------

# Tests run as root, which ignores permissions. The child imports everything it needs as root (the
# interpreter and site-packages may live under a root-only folder), then drops to uid/gid 65534
# before streamfold touches any checkpoint.
AS_NOBODY = """
import importlib, os, pkgutil, sys
import ml_dtypes, streamfold, tqdm, yaml  # ml_dtypes: streamfold imports it lazily, on first bf16/fp8 use
for m in pkgutil.walk_packages(streamfold.__path__, "streamfold."):  # every module but the torch tool
    if not m.name.startswith("streamfold.derive") and m.name != "streamfold.__main__":
        importlib.import_module(m.name)
os.setgroups([]); os.setgid(65534); os.setuid(65534)
from streamfold.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def world(tmp_path_factory):
    """A tree outside root's private tmp: a readable source, a read-only folder, a locked output."""
    import tempfile
    base = Path(tempfile.mkdtemp(prefix="streamfold-perm-"))
    os.chmod(base, 0o755)
    shutil.copytree(SAMPLE, base / "src")
    (base / "ro").mkdir(mode=0o555)
    os.chmod(base / "ro", 0o555)
    r = run_cli(base / "src", base / "locked", "-q")
    assert r.returncode == 0, r.stderr
    os.chmod(base / "locked", 0o000)
    yield base
    os.chmod(base / "locked", 0o755)
    os.chmod(base / "ro", 0o755)
    shutil.rmtree(base)


def run_as_nobody(*args):
    return subprocess.run([sys.executable, "-c", AS_NOBODY, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(SAMPLE.parents[1]), "HOME": "/tmp"})


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to uid 65534")
@pytest.mark.parametrize("case", matrix(["unwritable parent", "unwritable grandparent", "dst under a locked folder",
                                         "verify an unreadable DST", "unreadable SRC"],
                                        {"unwritable parent", "unreadable SRC"}))
def test_permission_errors_are_bad_input(world, case):
    args, needle = {
        "unwritable parent": ((world / "src", world / "ro" / "out"), f"{world / 'ro'}: cannot write"),
        "unwritable grandparent": ((world / "src", world / "ro" / "a" / "b"), f"{world / 'ro' / 'a'}: cannot"),
        "dst under a locked folder": ((world / "src", world / "locked" / "x"), f"{world / 'locked' / 'x'}: cannot"),
        "verify an unreadable DST": (("verify", world / "src", world / "locked"), f"{world / 'locked'}: cannot read"),
        "unreadable SRC": ((world / "locked", world / "ro" / "y"), f"{world / 'locked'}: cannot read"),
    }[case]
    before = tree_hash(world / "src")
    r = run_as_nobody(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamfold: error: ") and needle in lines[0], r.stderr
    assert "Permission denied" in lines[0]
    assert sorted(os.listdir(world / "ro")) == [] and tree_hash(world / "src") == before


@pytest.mark.parametrize("args", matrix([["inspect", SAMPLE, "--json"], ["inspect", SAMPLE, "--all"],
                                         ["verify", SAMPLE, "DST", "--json"], [SAMPLE, "NEW", "--json"]],
                                        lambda a: a[-2:] == ["NEW", "--json"]))
def test_closed_stdout_ends_quietly(tmp_path, args):
    """`... --json | head` with head already gone: no traceback, no "internal error", status 141."""
    r = run_cli(SAMPLE, tmp_path / "dst", "-q")
    assert r.returncode == 0, r.stderr
    args = [tmp_path / "dst" if a == "DST" else tmp_path / "new" if a == "NEW" else a for a in args]
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        p = subprocess.run([sys.executable, "-m", "streamfold", *map(str, args)], stdout=write,
                           stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(SAMPLE.parents[1])})
    finally:
        os.close(write)
    assert p.returncode == 141, p.stderr
    assert p.stderr == ""
    if "NEW" in map(str, args) or tmp_path / "new" in args:
        assert (tmp_path / "new" / "config.json").is_file()  # the conversion itself completed
