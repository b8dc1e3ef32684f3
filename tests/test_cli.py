"""The CLI as a user and a pipeline run it: exit codes, --json, --quiet, plan, no torch at run time."""
import json
import os
import re
import subprocess
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from streamfold.cli import main
from streamfold.core.reader import Checkpoint

SAMPLE = Path(__file__).resolve().parents[1] / "streamfold" / "sample"
ROOT = SAMPLE.parents[1]

# Make `import torch` / `import transformers` fail inside the child, as on a machine without them.
NO_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
from streamfold.cli import main
code = main(sys.argv[1:])
assert "torch" not in sys.modules and "transformers" not in sys.modules
sys.exit(code)
"""


def run(args, code=None):
    cmd = [sys.executable, "-c", code, *map(str, args)] if code else \
        [sys.executable, "-m", "streamfold", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_converts_with_torch_unimportable(tmp_path):
    r = run([SAMPLE, tmp_path / "out", "--quiet"], code=NO_TORCH)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["flashnorm"] is True and cfg["flashnorm_mode"] == "compat" and cfg["flashnorm_version"] == 1


def test_help_and_usage_errors_do_not_import_ml_dtypes():
    """ml_dtypes costs ~0.8 s to import (numpy 2.4 ufunc registration): only reading bf16/fp8 data pays it."""
    code = ("import sys\nfrom streamfold.cli import main\nfor argv in (['--help'], ['--mode', 'nope']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('ml_dtypes' in sys.modules)")
    r = run([], code=code)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "False", (r.stdout, r.stderr)


def test_json_report_and_quiet(tmp_path):
    r = run([SAMPLE, tmp_path / "a", "--json"])
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["norms_folded"] == 5 and rep["tensors_folded"] == 11 and rep["tensors_identity"] == 5
    assert rep["bytes_in"] == rep["bytes_out"] > 0
    r = run([SAMPLE, tmp_path / "b", "--quiet"])
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""


def test_summary_names_what_happened(tmp_path):
    r = run([SAMPLE, tmp_path / "a", "--mode", "strict", "--workers", "1"])
    assert r.returncode == 0, r.stderr
    assert "norms folded: 5" in r.stdout and "dropped: 5" in r.stdout
    assert re.search(r" s \(\d+(\.\d+)? [kMG]?B/s, 1 worker\)$", r.stdout.splitlines()[-1]), r.stdout
    assert json.loads(run([SAMPLE, tmp_path / "b", "--mode", "strict", "--json"]).stdout)["tensors_dropped"] == 5


def test_plan_reads_headers_only(tmp_path):
    r = run(["inspect", SAMPLE])
    assert r.returncode == 0, r.stderr
    assert ("FOLD  model.layers.*.input_layernorm  x2  -> model.layers.*.self_attn.q_proj.weight, "
            "model.layers.*.self_attn.k_proj.weight, model.layers.*.self_attn.v_proj.weight") in r.stdout
    assert "lm_head.weight" in r.stdout
    r = run([SAMPLE, "--plan", "--json"])
    plan = json.loads(r.stdout)
    assert plan["tensors"] == {"scale": 11, "bias": 0, "fill": 5, "drop": 0, "copy": 5}


def test_usage_errors_exit_nonzero():
    r = run([])
    assert r.returncode == 2
    r = run([SAMPLE])
    assert r.returncode == 2 and "destination" in r.stderr
    r = run([SAMPLE, "/tmp/x", "--workers", "0"])
    assert r.returncode == 2 and "--workers" in r.stderr


def test_workers_and_budget_give_identical_bytes(tmp_path):
    outs = []
    for i, extra in enumerate((["--workers", "1"], ["--workers", "4", "--memory-budget", "1M"])):
        d = tmp_path / f"o{i}" / "out"  # the same name: the card names DST's folder
        r = run([SAMPLE, d, "--quiet", *extra])
        assert r.returncode == 0, r.stderr
        outs.append({p.name: p.read_bytes() for p in sorted(d.iterdir())})
    assert outs[0] == outs[1]


def test_plan_lists_every_norm_with_all():
    r = run(["inspect", SAMPLE, "--all"])
    assert r.returncode == 0, r.stderr
    assert ("FOLD  model.layers.1.input_layernorm.weight  -> model.layers.1.self_attn.q_proj.weight, "
            "model.layers.1.self_attn.k_proj.weight, model.layers.1.self_attn.v_proj.weight") in r.stdout
    each = json.loads(run(["inspect", SAMPLE, "--json"]).stdout)["each_norm"]
    assert len(each) == 5 and {e["status"] for e in each} == {"fold"}
    assert each[-1] == {"norm": "model.norm", "status": "fold", "reason": "", "consumers": ["lm_head.weight"]}


def test_dry_run_and_dtype_spellings(tmp_path, capsys):
    plan = run([SAMPLE, "--plan", "--json"]).stdout
    r = run([SAMPLE, "--dry-run", "--json"])
    assert r.returncode == 0 and r.stdout == plan
    assert not any(tmp_path.iterdir())
    capsys.readouterr()
    for spelling in ("fp32", "f32", "FP32", "float32"):  # argument parsing: in this process
        assert main(["inspect", str(SAMPLE), "--merged-dtype", spelling, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["merged_dtype"] == "float32"
    r = run([SAMPLE, tmp_path / "bf", "--merged-dtype", "bf16", "--json"])  # the sample is bf16: = source
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["merged_dtype"] == "source"
    r = run(["verify", SAMPLE, tmp_path / "bf", "--merged-dtype", "bfloat16", "-q"])
    assert r.returncode == 0, r.stderr
    r = run([SAMPLE, tmp_path / "x", "--merged-dtype", "fp8"])
    assert r.returncode == 2 and "fp8" in r.stderr


def test_bf16_merged_dtype_is_refused_for_wider_sources(tmp_path):
    f32 = tmp_path / "f32"  # the sample with every tensor widened to float32: a float32 source
    shutil.copytree(SAMPLE, f32)
    ck = Checkpoint(SAMPLE)
    for shard, sf in ck.shards.items():
        save_file({n: np.asarray(ck.array(n), dtype=np.float32) for n in sf.tensors}, str(f32 / shard))
    ck.close()
    r = run([f32, tmp_path / "out", "--merged-dtype", "bf16"])
    assert r.returncode == 2, r.stderr
    assert "never narrows" in r.stderr and "F32" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_help_texts_fit_their_command():
    v = run(["verify", "--help"]).stdout
    assert "fold ahead" not in v and "checking both checkpoints" in v
    c = run(["convert", "--help"]).stdout
    assert "--dry-run" in c and "fp32" in c and "bf16" in c
