"""The rule-derivation engine (streamfold/derive), the family data files and derive-rules.

Expectations here are written by hand from the toy modules' definitions (not computed with the
engine); tests/test_architectures.py cross-checks the generated data files against the hand-written
facts of tests/factory.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import streamfold
from streamfold.derive.trace import trace
from tests.test_cli import NO_TORCH, ROOT, run


class RMS(nn.Module):
    def __init__(self, d, offset=0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)
        self.offset = offset

    def forward(self, x):
        return (self.offset + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class Toy(nn.Module):
    """n_lin -> two linears; n_gate -> token gather, sigmoid gate multiply, then an expert tensor
    [E, in, out] (indexed, matmul) and an einsum with [out, in]; n_act -> silu; n_post -> residual add;
    n_head -> reshaped into heads; n_norm -> another norm."""

    def __init__(self, d=8):
        super().__init__()
        self.config = type("C", (), {"hidden_size": d})()
        self.n_lin, self.n_gate, self.n_act, self.n_post, self.n_head, self.n_norm, self.inner = (
            RMS(d), RMS(d), RMS(d), RMS(d), RMS(d), RMS(d), RMS(d))
        self.a, self.b = nn.Linear(d, 5), nn.Linear(d, 3, bias=False)
        self.experts = nn.Parameter(torch.randn(2, d, 6))
        self.proj = nn.Parameter(torch.randn(4, d))
        self.gate = nn.Linear(d, 1)

    def forward(self, x):
        y = self.a(self.n_lin(x)).sum() + self.b(self.n_lin(x)).sum()
        h = self.n_gate(x)
        tok = h.reshape(-1, h.shape[-1])[torch.tensor([0, 2])]
        g = torch.sigmoid(self.gate(x)).reshape(-1, 1)[:2]
        y = y + ((tok * g) @ self.experts[1]).sum() + torch.einsum("td,od->to", tok, self.proj).sum()
        y = y + nn.functional.silu(self.n_act(x)).sum()
        y = y + (x + self.n_post(x)).sum()
        y = y + self.n_head(x).view(*x.shape[:-1], 2, 4).sum()
        y = y + self.inner(self.n_norm(x)).sum()
        return y


def _uses(tr):
    return [(u.kind, u.param, u.axis, u.bias) if u.kind == "consumer" else (u.kind, u.why) for u in tr.uses]


def test_tracer_consumers_and_reasons():
    m = Toy().eval()
    names = ["n_lin", "n_gate", "n_act", "n_post", "n_head", "n_norm", "inner"]
    got = trace(m, names, {"x": torch.randn(2, 3, 8)})
    assert _uses(got["n_lin"]) == [("consumer", "a.weight", 1, "a.bias"), ("consumer", "b.weight", 1, None)]
    # a gather of tokens and a multiply by a gate computed elsewhere commute with the per-channel scale
    assert _uses(got["n_gate"]) == [("consumer", "experts", 1, None), ("consumer", "proj", 1, None)]
    assert [u.kind for u in got["n_act"].uses] == ["block"] and "nonlinearity (silu" in got["n_act"].uses[0].why
    assert "post-norm" in got["n_post"].uses[0].why and "residual" in got["n_post"].uses[0].why
    assert "reshapes the channel axis" in got["n_head"].uses[0].why
    assert got["n_norm"].uses[0].why == "feeds another norm (inner)"
    assert all(u.kind == "block" for u in got["inner"].uses)  # its output is summed over channels


class Conv1DToy(nn.Module):
    """GPT-2's Conv1D: ``torch.addmm(bias, x, W)`` with W stored [in, out]; n_c feeds one, n_m a plain
    matmul by a computed matrix (not a parameter)."""

    def __init__(self, d=8):
        super().__init__()
        self.config = type("C", (), {"hidden_size": d})()
        self.n_c, self.n_m = RMS(d), RMS(d)
        self.weight = nn.Parameter(torch.randn(d, 5))
        self.bias = nn.Parameter(torch.randn(5))

    def forward(self, x):
        h = self.n_c(x).reshape(-1, x.shape[-1])
        y = torch.addmm(self.bias, h, self.weight).sum()
        return y + torch.addmm(self.bias, self.n_m(x).reshape(-1, x.shape[-1]), self.weight * 2).sum()


def test_tracer_reads_addmm_operands():
    """addmm(bias, x, W): the consumer is W along axis 0 (its input axis), with that bias."""
    got = trace(Conv1DToy().eval(), ["n_c", "n_m"], {"x": torch.randn(2, 3, 8)})
    assert _uses(got["n_c"]) == [("consumer", "weight", 0, "bias")]
    assert [u.kind for u in got["n_m"].uses] == ["block"] and "computed" in got["n_m"].uses[0].why


# -- the data files -------------------------------------------------------------------------------------
FAMILY_DIR = ROOT / "streamfold" / "rules" / "families"


def test_builtin_families_are_the_data_files():
    from streamfold.rules.loader import FAMILIES
    stems = sorted(p.stem for p in FAMILY_DIR.glob("*.toml"))
    assert sorted(FAMILIES) == stems and len(stems) >= 19
    src = (ROOT / "streamfold" / "rules" / "loader.py").read_text()
    assert "model.layers" not in src  # no rules in code
    for name in stems:  # the same loader and validation as a user's --rules file
        from streamfold.rules.schema import load_rules_file
        assert load_rules_file(FAMILY_DIR / f"{name}.toml")[name] == FAMILIES[name]


def test_readme_table_generated_from_the_data_files():
    from streamfold.rules.loader import FAMILIES
    from streamfold.derive.readme import render
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert render(text, FAMILIES) == text, "README table out of date: run python tools/derive_rules.py --readme"


# -- derive-rules -------------------------------------------------------------------------------------------
def test_derive_rules_missing_extra_is_one_line(tmp_path):
    r = run(["derive-rules", "llama"], code=NO_TORCH)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("streamfold: error: ") and r.stderr.count("\n") == 1
    assert 'pip install "streamfold[derive]"' in r.stderr


def test_derive_rules_file_converts_exactly(tmp_path, capsys):
    """derive-rules on a model folder writes TOML; converting with --rules is exactly the built-in
    conversion, and the float32-merged output's logits match the source in transformers."""
    from tests.factory import build_checkpoint, load_model, logits
    from tests.factory import test_inputs as make_inputs
    src = build_checkpoint("llama", tmp_path / "src", dtype="bfloat16", seed=5)
    from streamfold.cli import main  # in-process: this test's torch import is already paid
    assert main(["derive-rules", str(src)]) == 0
    rules = tmp_path / "rules.toml"
    rules.write_text(capsys.readouterr().out)
    rep = streamfold.convert(src, tmp_path / "out", merged_dtype="float32", rules=rules)
    assert rep.family == "rules" and rep.norms_folded == 5
    builtin = streamfold.convert(src, tmp_path / "builtin", merged_dtype="float32")
    assert builtin.family == "llama"
    for f in sorted((tmp_path / "builtin").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "out" / f.name).read_bytes()
    inputs = make_inputs("llama")
    ref, got = logits(src, inputs), logits(load_model(tmp_path / "out"), inputs)
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-5


@pytest.mark.full
def test_drift_check(tmp_path):
    """--check re-derives (and re-checks numerically) families and compares them with the stored files:
    the stored ones match under the installed transformers; an edited file is reported as drift."""
    import shutil
    folder = tmp_path / "families"
    shutil.copytree(FAMILY_DIR, folder)
    phi3 = folder / "phi3.toml"
    phi3.write_text(phi3.read_text().replace('into = ["model.layers.{n}.mlp.gate_up_proj"]',
                                             'into = ["model.layers.{n}.mlp.up_proj"]'))
    assert phi3.read_text() != (FAMILY_DIR / "phi3.toml").read_text()
    only = ["phi3", "gemma3", "stablelm", "nemotron", "qwen3_next", "lfm2"]
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "derive_rules.py"), "--check", "--families-dir",
                        str(folder), "--only", *only], capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1, r.stderr[-2000:]
    assert "1 of 6 families drifted: phi3" in r.stdout, r.stdout + r.stderr[-2000:]
    assert "DRIFT phi3" in r.stderr and "FAILED" not in r.stderr


@pytest.mark.full
def test_no_family_drifted():
    """Every stored family's rules equal what its tiny models derive under the installed transformers
    (--rules-only: tests/test_families.py checks the stored rules numerically, family by family)."""
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "derive_rules.py"), "--check", "--rules-only"],
                       capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.startswith("0 of ") and "families drifted" in r.stdout, \
        r.stdout + r.stderr[-3000:]


@pytest.mark.full
def test_rules_only_reports_drift(tmp_path):
    """--rules-only still sees an edited rule (and needs --check)."""
    import shutil
    folder = tmp_path / "families"
    shutil.copytree(FAMILY_DIR, folder)
    f = folder / "olmo2.toml"
    f.write_text(f.read_text().replace("post_feedforward_layernorm", "post_ffn_layernorm", 1))
    assert f.read_text() != (FAMILY_DIR / "olmo2.toml").read_text()
    tool = [sys.executable, str(ROOT / "tools" / "derive_rules.py")]
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(tool + ["--check", "--rules-only", "--families-dir", str(folder), "--only", "olmo2", "phi3"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "1 of 2 families drifted: olmo2" in r.stdout, r.stdout + r.stderr[-2000:]
    r = subprocess.run(tool + ["--rules-only"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "--rules-only needs --check" in r.stderr


# -- stand-in towers ---------------------------------------------------------------------------------------
def test_gemma3n_stand_in_replaces_only_the_vision_tower():
    """Under standin.towers("gemma3n") only the timm vision tower is replaced; the language model, audio
    tower and embedders are transformers' own classes, and the patch is undone afterwards."""
    from transformers import AutoModel
    from transformers.models.gemma3n import modeling_gemma3n as mg

    from streamfold.derive import standin, tiny
    model = tiny.build_tiny_model("gemma3n")
    inner = model.model
    assert type(inner.vision_tower) is standin.Gemma3nVisionStandIn
    assert type(inner.audio_tower) is mg.Gemma3nAudioEncoder
    assert type(inner.language_model) is mg.Gemma3nTextModel
    assert type(inner.embed_vision) is type(inner.embed_audio) is mg.Gemma3nMultimodalEmbedder
    assert mg.AutoModel is AutoModel  # no patch left behind
    names = [n for n, _ in inner.vision_tower.named_parameters()]
    assert names and all(n.startswith("timm_model.") for n in names)
    # the stand-in's output has the tower's layout: [batch, hidden, 16, 16] -> 256 soft tokens
    feats = inner.get_image_features(torch.randn(1, 3, 32, 32)).pooler_output
    assert feats.shape == (1, 256, model.config.text_config.hidden_size)
    with standin.towers("llama"):  # other types: untouched
        assert mg.AutoModel is AutoModel
