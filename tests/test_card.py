"""The model card (README.md) every conversion writes: Hub-style front matter, what changed, how to load."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import streamfold
from streamfold.card import render as card
from streamfold.card import table as card_table

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "streamfold" / "sample"
SOURCE_CARD = """---
license: other
license_name: tiny-community-license
license_link: https://example.org/tiny-license
language:
- en
- fr
base_model: tiny-org/tiny-llama-base
base_model_relation: finetune
pipeline_tag: text-generation
tags:
- onnx
extra_gated_prompt: accept the terms
---
# tiny-llama-instruct

SOURCE-CARD-BODY: this text must not reach the converted checkpoint's card.
"""


def parse(path: Path) -> tuple[dict, str]:
    text = path.read_text(encoding="utf-8")
    m = re.match(r"---\n(.*?)\n---\n(.*)", text, re.S)
    assert m, "the card must start with YAML front matter"
    meta = yaml.safe_load(m.group(1))
    assert isinstance(meta, dict)
    return meta, m.group(2)


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "tiny-llama-instruct"
    shutil.copytree(SAMPLE, d)
    (d / "README.md").write_text(SOURCE_CARD)
    return d


def test_card_front_matter_from_source_card(tmp_path, src):
    dst = tmp_path / "out"
    streamfold.convert(src, dst, base_model="tiny-org/tiny-llama-instruct")
    meta, body = parse(dst / "README.md")
    assert meta["base_model"] == "tiny-org/tiny-llama-instruct"
    assert meta["base_model_relation"] == "finetune"
    assert meta["license"] == "other" and meta["license_name"] == "tiny-community-license"
    assert meta["license_link"] == "https://example.org/tiny-license"
    assert meta["language"] == ["en", "fr"]
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert "flashnorm" in meta["tags"] and "flashnorm-compat" in meta["tags"]
    assert "onnx" not in meta["tags"] and "extra_gated_prompt" not in meta  # source-only metadata stays behind
    # the source card is replaced, its lineage carried over
    assert "SOURCE-CARD-BODY" not in body
    assert "itself a finetune of [tiny-org/tiny-llama-base](https://huggingface.co/tiny-org/tiny-llama-base)" in body
    assert "`tiny-community-license`, inherited from the source model (see https://example.org/tiny-license)" in body
    assert "--base-model tiny-org/tiny-llama-instruct" in body


def test_card_parses_with_huggingface_hub(tmp_path, src):
    from huggingface_hub import ModelCard
    dst = tmp_path / "out"
    streamfold.convert(src, dst, base_model="tiny-org/tiny-llama-instruct")
    hub_card = ModelCard.load(dst / "README.md")
    assert hub_card.data.base_model == "tiny-org/tiny-llama-instruct"
    assert hub_card.data.license == "other" and "flashnorm" in hub_card.data.tags
    assert hub_card.data.to_dict()["base_model_relation"] == "finetune"


def test_card_table_matches_plan(tmp_path, src):
    dst = tmp_path / "out"
    streamfold.convert(src, dst)
    _, body = parse(dst / "README.md")
    rows = [line for line in body.splitlines() if line.startswith("| `")]
    assert "| `model.layers.*.input_layernorm.weight` (x2) | learned per-channel `g` (bf16) | all ones (bf16) |" in rows
    assert ("| `model.layers.*.self_attn.{q,k,v}_proj.weight` | `W` (bf16) | `W · diag(g_input_layernorm)` (bf16) |"
            in rows)
    assert ("| `model.layers.*.mlp.{gate,up}_proj.weight` | `W` (bf16) | `W · diag(g_post_attention_layernorm)` "
            "(bf16) |" in rows)
    assert "| `lm_head.weight` | `W` (bf16) | `W · diag(g_model_norm)` (bf16) |" in rows
    assert "| `config.flashnorm_mode` | — | `\"compat\"` |" in rows
    assert body.startswith("\n# out\n")  # DST's name: what the usage below loads
    assert "model_id = './out'  # this folder, or its Hub repo id" in body
    # no tokenizer in src and no repo to take one from: no tokenizer call that cannot work
    assert "AutoTokenizer" not in body and "has no tokenizer files" in body
    assert "vllm serve ./out" in body
    assert f"streamfold {streamfold.__version__}" in body
    assert "python -m streamfold tiny-llama-instruct ./out\n" in body


def test_card_does_not_depend_on_paths(tmp_path, src):
    """The same conversion gives the same card (and manifest) wherever SRC and DST are (DST's folder
    name is in the card: the title and the usage that loads it)."""
    moved = tmp_path / "elsewhere" / "deeper" / src.name
    shutil.copytree(src, moved)
    a, b = tmp_path / "o1" / "same-name", tmp_path / "x" / "y" / "same-name"
    streamfold.convert(src, a)
    streamfold.convert(moved, b)
    assert (a / "README.md").read_bytes() == (b / "README.md").read_bytes()
    if (a / "SHA256SUMS").exists():
        assert (a / "SHA256SUMS").read_bytes() == (b / "SHA256SUMS").read_bytes()


def test_card_strict_float32_and_tied(tmp_path, src):
    cfg = json.loads((src / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (src / "config.json").write_text(json.dumps(cfg))
    dst = tmp_path / "out"
    streamfold.convert(src, dst, mode="strict", merged_dtype="float32")
    meta, body = parse(dst / "README.md")
    assert "flashnorm-strict" in meta["tags"]
    assert "| `model.layers.*.input_layernorm.weight` (x2) | learned per-channel `g` (bf16) | removed |" in body
    assert "`W · diag(g_input_layernorm)` (fp32)" in body and "stored in fp32" in body
    assert re.search(r"\| `model\.norm\.weight` \| learned `g` \(bf16\) \| unchanged: tied embeddings", body)
    rows = [line for line in body.splitlines() if line.startswith("| `")]
    assert not any(row.startswith("| `lm_head") for row in rows)  # the kept final norm folds nowhere
    assert "ties `lm_head` to the input embeddings" in body
    assert "vllm serve" not in body and "--mode compat" in body
    assert "--mode strict --merged-dtype float32" in body


def test_base_model_resolution(tmp_path):
    from streamfold.hub.client import Source
    cfg = {"_name_or_path": "some-org/some-model"}
    plain = tmp_path / "plain"
    plain.mkdir()
    cached = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / ("a" * 40)
    cached.mkdir(parents=True)
    assert card.base_model_for(Source(path=plain, display="plain"), {}) is None
    assert card.base_model_for(Source(path=plain, display="plain"), cfg) == "some-org/some-model"
    assert card.base_model_for(Source(path=plain, display="plain"), {"_name_or_path": "/home/x/model"}) is None
    assert card.base_model_for(Source(path=cached, display=str(cached)), cfg) == "HuggingFaceTB/SmolLM2-135M"
    hub_src = Source(path=cached, display="org/repo", repo_id="org/repo")
    assert card.base_model_for(hub_src, cfg) == "org/repo"
    assert card.base_model_for(hub_src, cfg, "me/override") == "me/override"
    with pytest.raises(streamfold.StreamfoldError, match="not a Hub repo id"):
        card.base_model_for(hub_src, cfg, "not a repo")


def test_no_base_model_no_relation(tmp_path):
    dst = tmp_path / "out"
    streamfold.convert(SAMPLE, dst)  # no card, no repo id anywhere
    meta, body = parse(dst / "README.md")
    assert "base_model" not in meta and "base_model_relation" not in meta and "license" not in meta
    assert "Inherited from the source model; see its model card" in body


def test_malformed_source_front_matter_is_ignored(tmp_path, src):
    (src / "README.md").write_text("---\nlicense: [unclosed\n---\n# x\n")
    dst = tmp_path / "out"
    streamfold.convert(src, dst)
    meta, _ = parse(dst / "README.md")
    assert "license" not in meta and "flashnorm" in meta["tags"]


def test_merge_patterns():
    assert card_table.merge_patterns(["a.*.q_proj.weight", "a.*.k_proj.weight", "a.*.v_proj.weight"]) == \
        ["a.*.{q,k,v}_proj.weight"]
    assert card_table.merge_patterns(["m.experts.*.w1.weight", "m.experts.*.w3.weight", "m.gate.weight"]) == \
        ["m.experts.*.w{1,3}.weight", "m.gate.weight"]
    assert card_table.merge_patterns(["x.weight"]) == ["x.weight"]
    assert card_table.merge_patterns(["p.a", "p.ab"]) == ["p.{a,ab}"]


def test_front_matter_reader():
    meta, body = card.front_matter(SOURCE_CARD)
    assert meta["license"] == "other" and body.startswith("# tiny-llama-instruct")
    assert card.front_matter("# no front matter\n") == ({}, "# no front matter\n")
    assert card.front_matter(None) == ({}, "")


def test_cli_conversion_writes_card_atomically(tmp_path, src):
    dst = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "streamfold", str(src), str(dst), "-q", "--base-model", "me/x"],
                       capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    meta, _ = parse(dst / "README.md")
    assert meta["base_model"] == "me/x"
    # nothing but the finished folder is left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", src.name])
