"""Architectures with nothing to fold, and out-of-scope ones, are refused with their one-line reason.

A family may record ``nothing_to_fold`` (every norm is a post-norm, ...) or ``refused`` (encoders,
encoder-decoders) instead of fold rules. Converting or inspecting one prints exactly one line with the
reason and writes nothing: ``streamfold: ...: nothing to fold: <reason>`` with exit status 5, or
``streamfold: error: ...: is not supported: <reason>`` with exit status 2. Small checkpoints written here
with numpy (no torch); the families come from a ``--rules`` file, the same schema as the built-ins.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import streamfold
from streamfold.core.errors import NothingToFold, StreamfoldError
from streamfold.rules.schema import FAMILIES, load_rules_file

NOTHING = "every norm is a post-norm: its output is added to the residual stream, not read by a linear"
REFUSED = "encoder model: FlashNorm folds the pre-norms of decoder language models"
RULES = {"families": {
    "postnorm_only": {"model_types": ["sf_postnorm"], "nothing_to_fold": NOTHING},
    "an_encoder": {"model_types": ["sf_encoder"], "refused": REFUSED, "folds": []},
}}


def _checkpoint(root: Path, model_type: str) -> Path:
    root.mkdir()
    g = np.random.default_rng(0)
    save_file({"model.layers.0.self_attn.q_proj.weight": g.standard_normal((8, 8)).astype(np.float32),
               "model.layers.0.post_attention_layernorm.weight": g.standard_normal(8).astype(np.float32),
               "model.norm.weight": g.standard_normal(8).astype(np.float32)}, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"model_type": model_type}))
    return root


@pytest.fixture()
def rules(tmp_path) -> Path:
    p = tmp_path / "rules.json"
    p.write_text(json.dumps(RULES))
    return p


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamfold", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_schema_accepts_them_without_folds(rules):
    fams = load_rules_file(rules)
    assert fams["postnorm_only"]["folds"] == [] and fams["an_encoder"]["refused"] == REFUSED


@pytest.mark.parametrize("bad, why", [({"nothing_to_fold": ""}, "reason string"), ({"refused": 3}, "reason string"),
                                      ({}, "non-empty list")])
def test_schema_refuses_bad_entries(tmp_path, bad, why):
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"families": {"x": {"model_types": ["x"], **bad}}}))
    with pytest.raises(StreamfoldError, match=why):
        load_rules_file(p)


def test_nothing_to_fold_is_one_line_exit_5(tmp_path, rules):
    src = _checkpoint(tmp_path / "src", "sf_postnorm")
    for args in ((src, tmp_path / "out", "--rules", rules), ("inspect", src, "--rules", rules)):
        r = _run(*args)
        assert r.returncode == 5, (r.returncode, r.stderr)
        assert r.stderr.strip().splitlines() == [
            f"streamfold: config.json: model_type 'sf_postnorm': nothing to fold: {NOTHING}"], r.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(NothingToFold):
        streamfold.convert(src, tmp_path / "out2", rules=rules)
    assert not (tmp_path / "out2").exists()


def test_refused_is_one_line_exit_2(tmp_path, rules):
    src = _checkpoint(tmp_path / "src", "sf_encoder")
    r = _run(src, tmp_path / "out", "--rules", rules)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.strip().splitlines() == [
        f"streamfold: error: config.json: model_type 'sf_encoder' is not supported: {REFUSED}"], r.stderr
    assert not (tmp_path / "out").exists()


def test_builtin_refusals_are_one_line():
    """Every built-in family marked refused or nothing_to_fold says so for each of its model types."""
    from streamfold.planning.compose import resolve
    marked = [(mt, f) for f in FAMILIES.values() if f.get("refused") or f.get("nothing_to_fold")
              for mt in f["model_types"]]
    for mt, fam in marked:
        with pytest.raises(StreamfoldError) as ei:
            resolve({"model_type": mt}, {})
        msg = str(ei.value)
        assert "\n" not in msg and (fam.get("refused") or fam["nothing_to_fold"]) in msg
        assert isinstance(ei.value, NothingToFold) == bool(fam.get("nothing_to_fold") and not fam.get("refused"))
