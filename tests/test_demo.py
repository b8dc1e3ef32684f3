"""`python -m streamfold demo`: convert's rules for DST, what a default conversion gives, no dead paths."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[1] / "streamfold" / "sample"


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "streamfold", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(SAMPLE.parents[1])})


def test_demo_refuses_a_non_empty_destination(tmp_path):
    ckpt = tmp_path / "parent" / "my-model"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"precious")
    for dst in (ckpt, ckpt.parent):  # the checkpoint itself, and the folder holding it
        r = run("demo", dst)
        assert r.returncode == 2 and "--overwrite" in r.stderr and str(dst) in r.stderr, r.stderr
        assert (ckpt / "model.safetensors").read_bytes() == b"precious"
    r = run("demo", ckpt, "--overwrite", "-q")
    assert r.returncode == 0, r.stderr
    assert not (ckpt / "model.safetensors").exists() and (ckpt / "config.json").is_file()


def test_demo_shows_the_default_conversion_and_only_existing_paths(tmp_path):
    dst = tmp_path / "demo-out"
    r = run("demo", dst)
    assert r.returncode == 0, r.stderr
    paths = set(re.findall(r"(?<![\w.])(/[^\s,()]+)", r.stdout))
    assert paths and all(Path(p).exists() for p in paths), paths
    assert r.stdout.strip().splitlines()[-1] == f"output: {dst}"
    assert "merged dtype source" in r.stdout.splitlines()[0]
    # the numbers shown are those of the kept (default) conversion, checked independently here
    v = json.loads(run("verify", SAMPLE, dst, "--forward", "--json").stdout)
    assert v["ok"] and v["merged_dtype"] == "source"
    line = next(l for l in r.stdout.splitlines() if l.startswith("default conversion"))
    assert f"max relative error {v['forward']['max_rel_error']:.1e}," in line
    assert any(l.startswith("with --merged-dtype float32") for l in r.stdout.splitlines())
    # without DST: everything it printed still exists (the temporary folder is not named)
    r = run("demo")
    assert r.returncode == 0, r.stderr
    paths = set(re.findall(r"(?<![\w.])(/[^\s,()]+)", r.stdout))
    assert all(Path(p).exists() for p in paths), paths
    assert "output:" not in r.stdout and "temporary folder, removed" in r.stdout
