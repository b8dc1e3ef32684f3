"""Partial fold of quantized sources, proven in stock transformers (CPU dequantization).

Sources are built in the test (tests/quant_models.py): FP8 block (Qwen3 and a DeepSeek-V3 MoE+MLA),
compressed-tensors FP8 channel and W4A16 group 32, gpt-oss with MXFP4 experts. Each is converted by the
CLI and checked against expectations written here by hand (which norms fold into which linears):

- every tensor that is not a folded norm or a folded consumer is byte-identical (quantized codes and
  scales included), ``quantization_config`` is unchanged;
- each folded weight equals ``bf16(W * g)`` computed by torch from the source file (the float32 product
  of two bf16 values is exact, so torch's float32 -> bf16 cast is the one rounding);
- logits: the converted model equals, bit for bit, the source model with those same folded weights put
  in by torch and identity norms (same graph, same weights); against the source itself the only change
  is that one rounding of the merged weights, so the tolerance is one bf16 unit roundoff 2^-8 on the
  relative L2 error of the logits (each merged weight is ``W·g·(1+d)``, ``|d| <= 2^-8``), with equal argmax;
- the source as transformers decodes it is near the unquantized model its codes came from (relative L2
  error of the logits under 0.35; measured 0.06 to 0.22, against 1.3 with every layer's output switched
  off), so the loader really reads the layout the builder wrote;
- strict mode loads in transformers too (missing norms filled with the identity) with the same logits;
- ``verify`` passes, ``inspect --json`` keeps each norm with a quantized consumer with a reason naming it.
Refusals (unknown quant method, FNUZ, static input scale on an unquantized weight) are one line, exit 2,
source untouched, no output.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests import quant_models as qm
from tests.test_bad_input import tree_hash

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[3, 17, 45, 101, 7, 250, 12, 99, 64, 5], [8, 200, 31, 2, 77, 140, 9, 33, 21, 180]])
BF16_U = 2.0 ** -8  # unit roundoff of bf16 (8 significant bits)

QWEN3 = dict(hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=128, vocab_size=320, tie_word_embeddings=False,
             max_position_embeddings=64)
LLAMA = {**QWEN3}
DSV3 = dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, q_lora_rank=128, kv_lora_rank=64, qk_rope_head_dim=64,
            qk_nope_head_dim=64, v_head_dim=128, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
            n_group=1, topk_group=1, first_k_dense_replace=1, vocab_size=320, tie_word_embeddings=False,
            max_position_embeddings=64)
GPT_OSS = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=64, vocab_size=320, num_local_experts=4, num_experts_per_tok=2,
               tie_word_embeddings=False, max_position_embeddings=64, sliding_window=16,
               layer_types=["sliding_attention", "full_attention"],
               rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 2.0,
                                "original_max_position_embeddings": 32, "beta_fast": 32.0, "beta_slow": 1.0,
                                "truncate": False})


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamfold", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def read_all(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def load(path: Path, **kw):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as tlog
    tlog.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager", **kw)
    return model.eval()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(IDS, use_cache=False).logits.float()


def load_kw(name: str) -> dict:
    if name == "gpt_oss":
        from transformers import Mxfp4Config
        return {"quantization_config": Mxfp4Config(dequantize=True)}
    return {}


class Case:
    """A built source and its expected folds: {norm module: [consumer weight names]} (hand-written)."""

    def __init__(self, name: str, src: Path, folds: dict[str, list[str]], kept_reason: dict[str, str],
                 reference: Path | None):
        self.name, self.src, self.folds, self.kept_reason = name, src, folds, kept_reason
        self.reference = reference  # the unquantized model the codes were made from (None: random codes)


def build(kind: str, root: Path) -> Case:
    src, ref = root / kind, root / f"{kind}-bf16"
    src.mkdir(parents=True)
    L0, L1 = "model.layers.0.", "model.layers.1."
    if kind == "fp8_qwen3":  # layer 0's MLP left unquantized: its norm folds, layer 1's is kept
        qm.fp8_block("qwen3", src, reference=ref, skip=(L0 + "mlp",), **QWEN3)
        folds = {L0 + "post_attention_layernorm": [L0 + "mlp.gate_proj.weight", L0 + "mlp.up_proj.weight"],
                 "model.norm": ["lm_head.weight"]}
        kept = {L0 + "input_layernorm": "consumer model.layers.*.self_attn.q_proj.weight is FP8 block-quantized (fp8)",
                L1 + "post_attention_layernorm": "consumer model.layers.*.mlp.gate_proj.weight is FP8 block-quantized (fp8)"}
    elif kind == "fp8_deepseek_v3":  # MoE + MLA, ue8m0 (power-of-two) scales
        qm.fp8_block("deepseek_v3", src, reference=ref, ue8m0=True, **DSV3)
        folds = {"model.norm": ["lm_head.weight"]}
        q = "FP8 block-quantized (fp8)"
        kept = {L0 + "input_layernorm": f"consumer model.layers.*.self_attn.q_a_proj.weight is {q}",
                L0 + "self_attn.q_a_layernorm": f"consumer model.layers.*.self_attn.q_b_proj.weight is {q}",
                L1 + "self_attn.kv_a_layernorm": f"consumer model.layers.*.self_attn.kv_b_proj.weight is {q}",
                L0 + "post_attention_layernorm": f"consumer model.layers.*.mlp.gate_proj.weight is {q}",
                L1 + "post_attention_layernorm": f"consumer model.layers.*.mlp.experts.*.gate_proj.weight is {q}"}
    elif kind == "ct_fp8_llama":  # layer 0's attention in the ignore list (re:): its input norm folds
        qm.ct_fp8_channel("llama", src, reference=ref, ignore=("lm_head", "re:model.layers.0.self_attn.*"), **LLAMA)
        folds = {L0 + "input_layernorm": [L0 + f"self_attn.{p}_proj.weight" for p in "qkv"],
                 "model.norm": ["lm_head.weight"]}
        q = "FP8 channel-quantized (compressed-tensors)"
        kept = {L1 + "input_layernorm": f"consumer model.layers.*.self_attn.q_proj.weight is {q}",
                L0 + "post_attention_layernorm": f"consumer model.layers.*.mlp.gate_proj.weight is {q}"}
    elif kind == "ct_w4_llama":
        qm.ct_w4_group("llama", src, reference=ref, group=32, **LLAMA)
        folds = {"model.norm": ["lm_head.weight"]}
        q = "INT4 group-quantized (compressed-tensors)"
        kept = {L0 + "input_layernorm": f"consumer model.layers.*.self_attn.q_proj.weight is {q}",
                L1 + "post_attention_layernorm": f"consumer model.layers.*.mlp.gate_proj.weight is {q}"}
    elif kind == "gpt_oss":  # bf16 attention: input_layernorm folds into q/k/v; the MLP norm reads MXFP4 experts
        qm.gpt_oss_mxfp4(src, **GPT_OSS)
        ref = None  # random MXFP4 codes: nothing unquantized to compare the decoding with
        folds = {f"model.layers.{n}.input_layernorm": [f"model.layers.{n}.self_attn.{p}_proj.weight" for p in "qkv"]
                 for n in (0, 1)}
        folds["model.norm"] = ["lm_head.weight"]
        kept = {L0 + "post_attention_layernorm":
                "consumer model.layers.*.mlp.experts.gate_up_proj is MXFP4 group-quantized (mxfp4)"}
    else:
        raise ValueError(kind)
    return Case(kind, src, folds, kept, ref)


def convert(case: Case, dst: Path, *extra) -> None:
    before = tree_hash(case.src)
    r = cli(case.src, dst, "-q", *extra)
    assert r.returncode == 0, r.stderr
    assert tree_hash(case.src) == before


def check_files(case: Case, dst: Path, strict: bool = False) -> int:
    """Byte-identical copies, exact folds, identity (or absent) norms, quantization_config unchanged.
    Returns how many quantized tensors (codes/scales) were compared byte for byte."""
    s, d = read_all(case.src), read_all(dst)
    consumers = {w: norm for norm, ws in case.folds.items() for w in ws}
    norm_weights = {n + ".weight" for n in case.folds}
    assert set(d) == set(s) - (norm_weights if strict else set())
    quantized = 0
    for name, t in s.items():
        if name in norm_weights:
            if not strict:
                assert d[name].dtype == t.dtype and torch.equal(d[name].float(), torch.ones_like(t.float())), name
        elif name in consumers:
            g = s[consumers[name] + ".weight"].float()
            want = (t.float() * g[None, :]).to(torch.bfloat16)  # exact f32 product, one rounding
            assert d[name].dtype == torch.bfloat16 and raw(d[name]) == raw(want), name
        else:
            assert d[name].dtype == t.dtype and d[name].shape == t.shape and raw(d[name]) == raw(t), name
            quantized += t.dtype in (torch.float8_e4m3fn, torch.int32, torch.uint8) or "scale" in name
    cs, cd = (json.loads((p / "config.json").read_text()) for p in (case.src, dst))
    assert cd["quantization_config"] == cs["quantization_config"]
    assert cd["flashnorm"] is True and cd["flashnorm_mode"] == ("strict" if strict else "compat")
    return quantized


def check_logits(case: Case, dst: Path) -> torch.Tensor:
    """The converted model vs (a) the source with torch-folded weights, bit for bit; (b) the source itself,
    within one bf16 rounding. Returns the converted logits."""
    kw = load_kw(case.name)
    src_model = load(case.src, **kw)
    want_src = logits(src_model)
    got = logits(load(dst, **kw))
    with torch.no_grad():
        for norm, ws in case.folds.items():
            g = src_model.get_submodule(norm).weight
            for w in ws:
                lin = src_model.get_submodule(w[: -len(".weight")])
                lin.weight.copy_((lin.weight * g[None, :]).to(torch.bfloat16).float())
            g.fill_(1.0)
    assert torch.equal(got, logits(src_model))
    if case.reference is not None:  # the loader really decodes the codes (switching the layers off: ~1.3)
        ref = logits(load(case.reference))
        assert ((want_src - ref).norm() / ref.norm()).item() < 0.35
    rel = ((got - want_src).norm() / want_src.norm()).item()
    print(f"{case.name}: relative L2 error of the logits vs the source {rel:.3g} (bound {BF16_U:.3g})")
    assert rel <= BF16_U, rel
    assert torch.equal(got.argmax(-1), want_src.argmax(-1))
    return got


def check_plan(case: Case) -> None:
    r = cli("inspect", case.src, "--json")
    assert r.returncode == 0, r.stderr
    each = {n["norm"]: n for n in json.loads(r.stdout)["each_norm"]}
    folded = {k for k, n in each.items() if n["status"] == "fold"}
    assert folded == set(case.folds)
    for norm, why in case.kept_reason.items():
        n = each[norm]
        assert n["status"] == "keep" and n["reason"] == f"{why}; use --dequantize", n


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    cache: dict[str, Case] = {}

    def get(kind: str) -> Case:
        if kind not in cache:
            cache[kind] = build(kind, root)
        return cache[kind]
    return get


def test_fp8_block_partial_fold(built, tmp_path):
    """The fast representative: FP8 block Qwen3, one MLP left unquantized; compat, verify, the card."""
    case = built("fp8_qwen3")
    check_plan(case)
    dst = tmp_path / "out"
    convert(case, dst)
    assert check_files(case, dst) == 2 * 11  # 11 FP8 linears: codes + weight_scale_inv, byte for byte
    check_logits(case, dst)
    r = cli("verify", case.src, dst, "--forward")  # the numpy forward reads FP8 block weights as q·s
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout + r.stderr
    assert "forward (16 tokens, float32 numpy)" in r.stdout and "argmax agreement 100.0%" in r.stdout, r.stdout
    card = (dst / "README.md").read_text()
    assert "The source is quantized (`fp8`: 11 FP8 block-quantized (fp8) modules)" in card
    assert "consumer model.layers.*.self_attn.q_proj.weight is FP8 block-quantized (fp8)" in card


@pytest.mark.full
@pytest.mark.parametrize("kind", ["fp8_qwen3", "fp8_deepseek_v3", "ct_fp8_llama", "ct_w4_llama", "gpt_oss"])
def test_partial_fold(built, tmp_path, kind):
    case = built(kind)
    check_plan(case)
    dst = tmp_path / "out"
    convert(case, dst)
    assert check_files(case, dst) > 0
    got = check_logits(case, dst)
    r = cli("verify", case.src, dst)
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout + r.stderr
    strict = tmp_path / "strict"
    convert(case, strict, "--mode", "strict")
    check_files(case, strict, strict=True)
    assert torch.equal(logits(load(strict, **load_kw(kind))), got)


@pytest.mark.full
def test_partial_output_is_recognised_and_changes_mode(built, tmp_path):
    """A partial-fold output is a FlashNorm checkpoint: converting it again writes nothing; --mode strict
    drops exactly the folded norms' identities (kept norms and quantized tensors stay)."""
    case = built("fp8_qwen3")
    dst = tmp_path / "out"
    convert(case, dst)
    r = cli(dst, tmp_path / "again")
    assert r.returncode == 4 and "already a FlashNorm checkpoint" in r.stderr, r.stderr
    convert(case, tmp_path / "strict", "--mode", "strict")
    r = cli(dst, tmp_path / "restrict", "-q", "--mode", "strict")
    assert r.returncode == 0, r.stderr
    assert read_all(tmp_path / "restrict").keys() == read_all(tmp_path / "strict").keys()


def _refused(src: Path, tmp_path: Path, needle: str) -> None:
    before = tree_hash(src)
    dst = tmp_path / "dst"
    r = cli(src, dst)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("streamfold: error: "), r.stderr
    assert needle in lines[0], lines[0]
    assert tree_hash(src) == before and not dst.exists()


def _copy_with(case: Case, tmp_path: Path, quant: dict | None = None) -> Path:
    src = tmp_path / "src"
    shutil.copytree(case.src, src)
    if quant is not None:
        cfg = json.loads((src / "config.json").read_text())
        cfg["quantization_config"] = {**cfg["quantization_config"], **quant}
        (src / "config.json").write_text(json.dumps(cfg))
    return src


def _shard_of(src: Path, name: str) -> Path:
    return src / json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][name]


@pytest.mark.full
def test_e8m0_scales_are_copied(built, tmp_path):
    """DeepSeek-V4 / MX-style scales stored as F8_E8M0 (and as raw U8 bytes) are copied byte for byte; verify passes."""
    case = built("fp8_qwen3")
    src = _copy_with(case, tmp_path, {"scale_fmt": "ue8m0"})
    a, b = "model.layers.1.self_attn.q_proj.weight_scale_inv", "model.layers.1.self_attn.k_proj.weight_scale_inv"
    shard = _shard_of(src, a)
    tensors = load_file(shard)
    tensors[a] = torch.randint(100, 130, tensors[a].shape, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    tensors[b] = torch.randint(100, 130, tensors[b].shape, dtype=torch.uint8)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    dst = tmp_path / "out"
    r = cli(src, dst, "-q")
    assert r.returncode == 0, r.stderr
    got = read_all(dst)
    assert got[a].dtype == torch.float8_e8m0fnu and raw(got[a]) == raw(tensors[a])
    assert got[b].dtype == torch.uint8 and raw(got[b]) == raw(tensors[b])
    r = cli("verify", src, dst)
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout + r.stderr
    out = _shard_of(dst, a)  # one scale byte changed in the output: verify names the tensor
    t = load_file(out)
    t[a] = t[a].view(torch.uint8).clone()
    t[a].view(-1)[0] ^= 1
    t[a] = t[a].view(torch.float8_e8m0fnu)
    save_file(t, str(out), metadata={"format": "pt"})
    r = cli("verify", src, dst)
    assert r.returncode == 3 and "FAIL" in r.stdout and a in r.stdout, r.stdout + r.stderr  # EXIT_FAILED


def test_refused_unknown_quant_method(built, tmp_path):
    src = _copy_with(built("fp8_qwen3"), tmp_path, {"quant_method": "hqq"})
    _refused(src, tmp_path, "config.json: quantization_config quant_method 'hqq' is not a format streamfold knows")


@pytest.mark.parametrize("how", ["dtype", "config"])
def test_refused_fnuz(built, tmp_path, how):
    case = built("fp8_qwen3")
    w = "model.layers.1.self_attn.q_proj.weight"
    if how == "config":
        src = _copy_with(case, tmp_path, {"fmt": "float8_e4m3fnuz"})
        _refused(src, tmp_path, "config.json: quantization_config.fmt asks for AMD's FNUZ float8")
        return
    src = _copy_with(case, tmp_path)
    shard = _shard_of(src, w)
    tensors = load_file(shard)
    tensors[w] = tensors[w].view(torch.uint8).view(torch.float8_e4m3fnuz)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    _refused(src, tmp_path, f"{shard.name}: tensor '{w}' is F8_E4M3FNUZ: AMD's FNUZ float8")


def test_static_input_scale(built, tmp_path):
    """On a quantized consumer the norm is kept (the reason names the scale); beside an unquantized weight
    (activation-only quantization) the checkpoint is refused."""
    case = built("fp8_qwen3")
    src = _copy_with(case, tmp_path, {"activation_scheme": "static"})
    shard = _shard_of(src, "model.layers.1.mlp.up_proj.weight_scale_inv")
    tensors = load_file(shard)
    tensors["model.layers.1.mlp.up_proj.activation_scale"] = torch.tensor(0.5)
    tensors["model.layers.0.mlp.up_proj.input_scale"] = torch.tensor(0.5)  # layer 0's MLP is bf16
    save_file(tensors, str(shard), metadata={"format": "pt"})
    _refused(src, tmp_path, f"{shard.name}: tensor 'model.layers.0.mlp.up_proj.input_scale' is a static input "
                            "scale of 'model.layers.0.mlp.up_proj', whose weight is not quantized")
    del tensors["model.layers.0.mlp.up_proj.input_scale"]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    r = cli("inspect", src, "--json")
    assert r.returncode == 0, r.stderr
    each = {n["norm"]: n for n in json.loads(r.stdout)["each_norm"]}
    assert each["model.layers.1.post_attention_layernorm"]["reason"] == (
        "consumer model.layers.*.mlp.up_proj.weight is FP8 block-quantized (fp8) with a static input scale "
        "'model.layers.*.mlp.up_proj.activation_scale' (its activations are quantized against a fixed range, "
        "so it must see the norm's output); use --dequantize")


from tests.hubserver import hub_server  # noqa: E402,F401  (a fixture)


@pytest.mark.full
def test_hub_inspect_and_stream(built, tmp_path, hub_server):  # noqa: F811
    """The same plan from remote headers (inspect of a repo id), and --stream writes what a local conversion
    writes (quantized shards copied through Range reads, verified, one commit)."""
    import streamfold
    case = built("fp8_qwen3")
    hub_server.add_repo("org/fp8", case.src)
    r = cli("inspect", "org/fp8", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["quantization"] == {"method": "fp8", "modules": 11, "formats": {"FP8 block-quantized (fp8)": 11}}
    assert {n["norm"] for n in d["each_norm"] if n["status"] == "fold"} == set(case.folds)
    ref = tmp_path / "ref" / "fp8"
    convert(case, ref)
    streamfold.convert("org/fp8", tmp_path / "fp8", push_to_hub="me/fp8-flashnorm", stream=True, verify=True)
    got = hub_server.files("me/fp8-flashnorm")
    for name in (p.name for p in ref.iterdir() if p.suffix in (".safetensors", ".json") and p.name != "config.json"):
        assert got[name] == (ref / name).read_bytes(), name
    assert json.loads(got["config.json"])["quantization_config"] == json.loads((case.src / "config.json").read_text())[
        "quantization_config"]
