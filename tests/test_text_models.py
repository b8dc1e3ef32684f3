"""A multimodal wrapper's rules hold only for the language model types they were derived with.

LLaVA-style wrappers build their language model from any ``text_config`` (``AutoModel.from_config``), and
the same norm names mean different things in different text models (Gemma 2's
``post_attention_layernorm`` is a post-norm; Gemma's norms multiply by ``1 + w``). A wrapper family
records ``text_model_types``; a checkpoint whose ``text_config.model_type`` is another type is refused
with one line, exit 2, nothing written. Built from a real tiny LLaVA (transformers) saved by
``save_pretrained``; only its config's text model type is changed.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

tiny = pytest.importorskip("streamfold.derive.tiny")

import streamfold  # noqa: E402
from streamfold.rules.patterns import config_get  # noqa: E402
from streamfold.rules.schema import FAMILIES, validate_family  # noqa: E402


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Path:
    return tiny.save_sharded(tiny.build_tiny_model("llava"), tmp_path_factory.mktemp("llava") / "src")


def _with_text_model(src: Path, dst: Path, text_type: str | None) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).symlink_to(p)
    cfg = json.loads((src / "config.json").read_text())
    if text_type is None:
        del cfg["text_config"]["model_type"]
    else:
        cfg["text_config"]["model_type"] = text_type
    (dst / "config.json").unlink()
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_llava_family_records_its_text_models():
    fam = FAMILIES["llava"]
    assert fam["text_model_types"][0] == fam["defaults"]["text_config.model_type"] == "llama"
    assert {"mistral", "qwen2"} <= set(fam["text_model_types"])
    assert "gemma" not in fam["text_model_types"]


def test_other_language_model_is_refused_in_one_line(llava, tmp_path):
    src = _with_text_model(llava, tmp_path / "gemma2", "gemma2")
    before = _digest(src)
    r = subprocess.run([sys.executable, "-m", "streamfold", str(src), str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and line.startswith("streamfold: error: ")
    assert "'gemma2' language model (text_config.model_type)" in line and "llama, mistral, qwen2" in line
    assert not (tmp_path / "out").exists() and _digest(src) == before


@pytest.mark.full
@pytest.mark.parametrize("text_type", ["mistral", None])  # another derived type; none given: the default
def test_derived_language_models_convert(llava, tmp_path, text_type):
    src = _with_text_model(llava, tmp_path / "src", text_type)
    report = streamfold.convert(src, tmp_path / "out")
    assert report.norms_folded > 0


def test_dotted_config_keys_and_schema():
    cfg = {"model_type": "llava", "text_config": {"model_type": "qwen2", "hidden_size": 8}}
    assert config_get(cfg, "text_config.model_type") == "qwen2"
    assert config_get(cfg, "hidden_size") == 8  # the text config's field, as before
    assert config_get({"model_type": "llava"}, "text_config.model_type", "llama") == "llama"
    bad = {**FAMILIES["llava"], "text_model_types": "llama"}
    with pytest.raises(streamfold.StreamfoldError, match="text_model_types"):
        validate_family("x", bad, "rules.json")
