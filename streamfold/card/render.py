"""The model card (``README.md``) of a converted checkpoint, in the Hugging Face Hub's conventions.

YAML front matter: ``base_model`` (the source repo) with ``base_model_relation``, the source's
``license`` (and ``license_name`` / ``license_link`` / ``language``), ``library_name``, ``pipeline_tag``
and ``tags`` (``flashnorm`` ...). The body says what FlashNorm is, what changed (a table of tensor
families: norm -> consumers, values and dtypes, from the conversion plan), how to load the checkpoint,
and the streamfold version and command that made it. The source's own card is never copied: its
license and lineage are carried over into this one.
"""
from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

from .dequant import dequant_note, made_lines
from .table import change_rows, dtype_names
from ..core.errors import StreamfoldError
from ..core.files import CARD_NAME
from ..planning.planner import Kind, Plan
from ..core.units import human_bytes

PAPER = "https://arxiv.org/abs/2407.09577"
TRICKS = "https://github.com/OpenMachine-ai/transformer-tricks"
# The Hub's model tree knows four relations: adapter, merge, quantized, finetune. A FlashNorm checkpoint
# is a complete set of weights of the same architecture, with values derived from one base model and
# stored at the same precision. "adapter" (partial weights on top of the base), "merge" (several
# parents) and "quantized" (reduced precision: the Hub lists these as quantizations, where people look
# for low-bit builds) would each be wrong; "finetune" is the Hub's relation for a full-weight derivative
# of a single base, and is also what the Hub infers for such a safetensors repo when it is not set.
BASE_MODEL_RELATION = "finetune"
TAGS = ["flashnorm", "streamfold", "efficient-inference"]
_FRONT = re.compile(r"\A\s*---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.S)
_CACHE_PATH = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")
CITATION = """\
@misc{graef2024flashnormfastnormalizationtransformers,
  title={FlashNorm: Fast Normalization for Transformers},
  author={Nils Graef and Matthew Clapp and Andrew Wasielewski},
  year={2024},
  eprint={2407.09577},
  archivePrefix={arXiv},
  primaryClass={cs.LG},
  url={https://arxiv.org/abs/2407.09577},
}"""


def front_matter(text: str | None) -> tuple[dict, str]:
    """(metadata, body) of a model card; metadata is ``{}`` when absent or not valid YAML."""
    if not text:
        return {}, text or ""
    m = _FRONT.match(text)
    if not m:
        return {}, text
    import yaml
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}, text[m.end():]
    return (data if isinstance(data, dict) else {}), text[m.end():]


def _repo_like(text) -> bool:
    from ..hub.client import is_repo_id
    return isinstance(text, str) and is_repo_id(text)


def base_model_for(source, cfg: dict, override: str | None = None) -> str | None:
    """The repo id this checkpoint derives from: ``override``, the source repo id, a local path inside
    the Hugging Face cache (``models--org--name/snapshots/<commit>``), or config ``_name_or_path`` when it
    is a repo id; else None (omitted from the card)."""
    if override is not None:
        if not _repo_like(override):
            raise StreamfoldError(f"--base-model {override}: not a Hub repo id (org/name)")
        return override
    if source.repo_id:
        return source.repo_id
    m = _CACHE_PATH.search(Path(source.path).resolve().as_posix())
    if m and _repo_like(f"{m.group(1)}/{m.group(2)}"):
        return f"{m.group(1)}/{m.group(2)}"
    name = cfg.get("_name_or_path")
    if _repo_like(name) and not Path(name).exists():
        return name
    return None


def display_path(p: str | os.PathLike) -> str:
    """A path as shown in the card: relative paths as given, absolute ones by their name only."""
    text = os.fspath(p)
    return Path(text).name if os.path.isabs(text) else text


def command_line(src: str, dst: str | os.PathLike, *, mode: str, merged_dtype: str, revision: str | None = None,
                 rules=None, base_model: str | None = None, push_to_hub: str | None = None,
                 private: bool = False, dequantize: str | None = None) -> str:
    """The CLI command equivalent to a conversion (absolute local paths shortened to their names;
    ``dequantize``: the plan's mode, ``"consumers"`` spelled as the bare flag)."""
    args = ["python", "-m", "streamfold", src if _repo_like(src) and not Path(src).exists() else display_path(src),
            display_path(dst)]
    if mode != "compat":
        args += ["--mode", mode]
    if merged_dtype != "source":
        args += ["--merged-dtype", merged_dtype]
    if dequantize:
        args += ["--dequantize"] + ([] if dequantize == "consumers" else [dequantize])
    if revision:
        args += ["--revision", revision]
    if isinstance(rules, (str, os.PathLike)):
        args += ["--rules", display_path(rules)]
    if base_model:
        args += ["--base-model", base_model]
    if push_to_hub:
        args += ["--push-to-hub", push_to_hub] + (["--private"] if private else [])
    return shlex.join(args)


# --- the card ---------------------------------------------------------------------------------------

def _pipeline_tag(cfg: dict) -> str | None:
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs and isinstance(archs[0], str) else ""
    if arch.endswith("ForCausalLM"):
        return "text-generation"
    if arch.endswith("ForConditionalGeneration") and "vision_config" in cfg:
        return "image-text-to-text"
    if arch.endswith("ForSequenceClassification"):
        return "text-classification"
    return None


def metadata(*, source_meta: dict, cfg: dict, base_model: str | None, mode: str) -> dict:
    """The card's YAML front matter as a dict (key order as written)."""
    meta: dict = {}
    if base_model:
        meta["base_model"] = base_model
        meta["base_model_relation"] = BASE_MODEL_RELATION
    for key in ("license", "license_name", "license_link", "language"):
        if source_meta.get(key):
            meta[key] = source_meta[key]
    meta["library_name"] = "transformers"
    tag = source_meta.get("pipeline_tag") or _pipeline_tag(cfg)
    if isinstance(tag, str) and tag:
        meta["pipeline_tag"] = tag
    meta["tags"] = TAGS + [f"flashnorm-{mode}"]
    return meta


def hub_endpoint() -> str:
    """The Hub that links point at: huggingface_hub's endpoint (``HF_ENDPOINT``, default huggingface.co).

    Read from huggingface_hub when it is loaded (it reads ``HF_ENDPOINT`` once, at import), else from the
    environment the same way: a local conversion never imports huggingface_hub.
    """
    constants = sys.modules.get("huggingface_hub.constants")
    endpoint = getattr(constants, "ENDPOINT", None) or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    return str(endpoint).rstrip("/")


def _hub_link(repo: str) -> str:
    return f"[{repo}]({hub_endpoint()}/{repo})"


def _lineage(source_meta: dict) -> str:
    parents = source_meta.get("base_model")
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list):
        return ""
    parents = [p for p in parents if isinstance(p, str) and p]
    if not parents:
        return ""
    rel = source_meta.get("base_model_relation")
    how = {"finetune": "a finetune of", "merge": "a merge of", "adapter": "an adapter on",
           "quantized": "a quantization of"}.get(rel, "derived from")
    return f" The source model is itself {how} {', '.join(_hub_link(p) if _repo_like(p) else p for p in parents)}."


def render(*, plan, tensors, cfg: dict, folder: Path | None = None, source_display: str,
           source_repo: str | None, source_commit: str | None, source_card: str | None,
           base_model: str | None, title: str, load_ref: str, command: str, version: str,
           bytes_in: int, bytes_out: int, dequant_counts: dict | None = None) -> str:
    """The full ``README.md`` text (``dequant_counts``: ``{tensor: [exact, rounded]}`` of ``--dequantize``)."""
    import yaml

    src_meta, _ = front_matter(source_card)
    meta = metadata(source_meta=src_meta, cfg=cfg, base_model=base_model, mode=plan.mode)
    head = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)
    compat = plan.mode == "compat"
    if source_repo:
        rev = f" (commit `{source_commit[:12]}`)" if source_commit else ""
        of = f"{_hub_link(source_repo)}{rev}"
    elif base_model:
        of = f"{_hub_link(base_model)} (converted from a local copy, `{source_display}`)"
    else:
        of = f"`{source_display}`"
    merged = {a.out_dtype for a in plan.actions.values() if a.kind == Kind.SCALE}
    src_dtypes = {tensors[n].dtype for n, a in plan.actions.items() if a.kind == Kind.SCALE}
    if merged and merged != src_dtypes:
        rounding = (f"Merged weights are stored in {dtype_names(merged)} (the source stores {dtype_names(src_dtypes)}): no "
                    "rounding at all, which keeps full precision for lower-precision inference later.")
    elif merged:
        rounding = (f"Merged weights are the exact products `w · g` rounded once (round-to-nearest-even) to the "
                    f"source dtype, {dtype_names(merged)}.")
    else:
        rounding = "No weights needed merging."
    if compat:
        loads = ("The folded norms are kept with identity weights, so this checkpoint loads in stock "
                 "`transformers` and `vLLM` with no code changes.")
    else:
        loads = ("The folded norm weights are removed from the state dict (strict mode). `transformers` loads "
                 "it with a warning that those weights are missing and initializes them to the identity, which "
                 "is the correct value for a FlashNorm checkpoint; stock vLLM refuses checkpoints with missing "
                 "weights (convert with `--mode compat` for vLLM).")
    kept = [n for n in plan.norms if n.status == "keep"]
    L = [f"---\n{head}---", "", f"# {title}", "",
         f"FlashNorm-prepared {'compatibility' if compat else 'strict'} checkpoint of {of}."
         + _lineage(src_meta), "",
         "The FlashNorm transformation is mathematically exact: this model computes the same function as "
         f"the source. {rounding} {loads}", "",
         "## What is FlashNorm?", "",
         "An exact reformulation of `Norm -> Linear`: the per-channel normalization weight `g` is folded into "
         "the linear layers that read the norm's output (`W* = W · diag(g)`, i.e. column `j` of `W` scaled by "
         "`g[j]`), computed once at conversion. The norm then has no learned scale and only divides by "
         "`RMS(x)`, a scalar that can be applied after the matmul, so the matrix multiplication and the RMS "
         f"reduction can run in parallel. See the [paper]({PAPER}) and the [transformer-tricks]({TRICKS}) repo.",
         "", "## What's different from the source checkpoint?", "",
         "| Tensor | Source | This checkpoint |", "|---|---|---|"]
    for t, s, o in change_rows(plan, tensors):
        L.append(f"| {t} | {s} | {o} |")
    L += ["| `config.flashnorm` | — | `true` |", f"| `config.flashnorm_mode` | — | `\"{plan.mode}\"` |",
          "| `config.flashnorm_version` | — | `1` |"]
    vis = plan.vision_summary() if hasattr(plan, "vision_summary") else None
    L += ["| `config.flashnorm_vision` | — | `true` |"] if vis else []
    L.append("")
    notes = []
    if vis:
        folded = ", ".join(f"`{g['norm']}`" for g in vis["norms"] if g["status"] == "fold") or "none"
        notes.append(f"Vision tower folded too (`--fold-vision`): {vis['folded']} tower norms folded ({folded}), "
                     f"{vis['kept']} kept (their output does not go only into linears).")
    if any("tied" in n.reason for n in kept):
        notes.append("The final norm is unchanged because the model ties `lm_head` to the input embeddings: "
                     "folding it would change the embeddings too.")
    composed = getattr(plan, "composed", None)
    if composed is not None:
        kept_whole = ", ".join(f"`{o}*`" for o in composed.others) or "nothing else"
        notes.append(f"Composed wrapper: model type `{composed.wrapper_type}` has no streamfold family of its own; "
                     f"its language model (`text_config` model type `{composed.text_type}`, under "
                     f"`{composed.prefix}*`) was folded with the rules of family `{composed.text_family}`, and "
                     f"everything else was kept whole ({kept_whole}).")
    if getattr(plan, "layout", None):
        notes.append(f"Tensor names are spelled as in the source ({plan.layout}), which transformers loads.")
    if plan.unknown_norms:
        notes.append(f"{len(plan.unknown_norms)} norm-like tensors that no streamfold rule covers were copied "
                     "unchanged.")
    quant = plan.quant_summary()
    if quant and plan.dequant is not None:
        notes.append(dequant_note(plan, tensors, dequant_counts))
    elif quant:
        kinds = ", ".join(f"{n} {k}" for k, n in quant["formats"].items())
        notes.append(f"The source is quantized (`{quant['method']}`: {kinds} modules): their codes and scales are "
                     "byte-for-byte copies and `quantization_config` is unchanged. A norm is folded only where every "
                     "linear reading it is unquantized; a norm read by a quantized linear is kept (see the table), "
                     "since codes and scales cannot absorb a per-channel factor exactly.")
    notes.append("All other tensors are byte-for-byte copies of the source.")
    L += [" ".join(notes), ""]
    L += _usage(cfg, folder, load_ref, compat, tokenizer_from=source_repo or base_model,
                on_hub=_repo_like(load_ref))
    L += ["## Numerical behavior", "",
          "The fold is exact in real arithmetic. In float32 inference the outputs match the source up to "
          "float rounding. Lower-precision kernels (fp16/bf16, vLLM) compute `x̂ · W*` instead of "
          "`(x̂ ⊙ g) · W`, so logits can differ in the last bits and greedy decoding can diverge at near-ties; "
          "this holds for any checkpoint with precomputed folded weights, not only FlashNorm.", ""]
    tcount = {k: plan.count(k) for k in (Kind.SCALE, Kind.FILL, Kind.DROP, Kind.BIAS, Kind.COPY)}
    L += ["## How this checkpoint was made", "",
          f"Converted with streamfold {version} (streaming, torch-free) from {of}, by the equivalent of "
          "(the output folder's name aside):", "",
          "```bash", command, "```", "",
          f"- mode `{plan.mode}`, merged dtype `{plan.merged_dtype}`; model type `{plan.model_type}` "
          f"(streamfold family `{plan.family}`), norm convention `{'1 + w' if plan.offset else 'w'}`",
          f"- norms folded: {len(plan.norms) - len(kept)}, kept: {len(kept)}; tensors folded: {tcount['scale']}, "
          f"set to identity: {tcount['fill']}, removed: {tcount['drop']}, biases updated: {tcount['bias']}, "
          f"copied: {tcount['copy']}",
          f"- tensor data: {human_bytes(bytes_in)} in, {human_bytes(bytes_out)} out",
          *made_lines(plan, dequant_counts), "",
          "## Citation", "", "```bibtex", CITATION, "```", "", "## License", ""]
    lic = src_meta.get("license_name") or src_meta.get("license")
    link = src_meta.get("license_link")
    if lic:
        L.append(f"`{lic}`, inherited from the source model" + (f" (see {link})." if link else "."))
    else:
        L.append("Inherited from the source model; see its model card and license files.")
    return "\n".join(L) + "\n"


def _usage(cfg: dict, folder: Path | None, ref: str, compat: bool, tokenizer_from: str | None,
           on_hub: bool) -> list[str]:
    archs = cfg.get("architectures") or [""]
    causal = isinstance(archs[0], str) and archs[0].endswith("ForCausalLM")
    has_tok = folder is None or any((folder / f).is_file() for f in
                                    ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    where = "" if on_hub else "  # this folder, or its Hub repo id once uploaded"
    out = ["## Usage", "", "```python"]
    if causal and not has_tok and not tokenizer_from:  # no tokenizer anywhere we know of: token ids
        out += ["import torch", "from transformers import AutoModelForCausalLM", "",
                f"model_id = {ref!r}{where}",
                "model = AutoModelForCausalLM.from_pretrained(model_id)",
                "# this checkpoint has no tokenizer files: encode text with the source model's tokenizer",
                "ids = torch.tensor([[1, 2, 3, 4]])",
                "out = model.generate(ids, max_new_tokens=20, do_sample=False)",
                "print(out[0].tolist())"]
    elif causal:
        if has_tok:
            tok = "tok = AutoTokenizer.from_pretrained(model_id)"
        else:
            tok = f"tok = AutoTokenizer.from_pretrained({tokenizer_from!r})  # the source model's tokenizer"
        out += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f"model_id = {ref!r}{where}", tok,
                "model = AutoModelForCausalLM.from_pretrained(model_id)",
                "ids = tok('Once upon a time there was', return_tensors='pt').input_ids",
                "out = model.generate(ids, max_new_tokens=50, do_sample=False)",
                "print(tok.decode(out[0], skip_special_tokens=True))"]
    else:
        out += ["from transformers import AutoModel", "", f"model_id = {ref!r}{where}",
                "model = AutoModel.from_pretrained(model_id)"]
    out += ["```", ""]
    if compat:
        out += ["With vLLM:", "", "```bash", f"vllm serve {shlex.quote(ref)}", "```", ""]
    else:
        out += ["vLLM: not supported for strict checkpoints (the norm weights are absent); convert with "
                "`--mode compat` to serve with stock vLLM.", ""]
    return out


def write_card(folder: str | os.PathLike, *, plan, tensors, cfg: dict, source, dst: str | os.PathLike,
               version: str, bytes_in: int, bytes_out: int, push_to_hub: str | None = None,
               base_model: str | None = None, rules=None, private: bool = False,
               dequant_counts: dict | None = None) -> Path:
    """Write ``folder/README.md`` for a conversion (``source`` is a :class:`streamfold.hub.client.Source`)."""
    # The card names DST by its folder name (what the usage snippet loads) or the repo it is pushed to,
    # never by its location: the same conversion into folders of the same name gives the same bytes
    # (and SHA256SUMS) wherever they are.
    folder = Path(folder)
    base = base_model_for(source, cfg, base_model)
    src_name = source.repo_id or (base if _CACHE_PATH.search(Path(source.path).resolve().as_posix()) else None) \
        or Path(source.path).resolve().name
    title = push_to_hub.split("/")[-1] if push_to_hub else Path(dst).resolve().name
    ref = push_to_hub or f"./{title}"
    command = command_line(source.repo_id or src_name, f"./{title}", mode=plan.mode,
                           merged_dtype=plan.merged_dtype, revision=source.revision, rules=rules,
                           base_model=base_model, push_to_hub=push_to_hub, private=private,
                           dequantize=plan.dequant.mode if plan.dequant is not None else None)
    text = render(plan=plan, tensors=tensors, cfg=cfg, folder=folder, source_display=src_name,
                  source_repo=source.repo_id, source_commit=source.commit, source_card=source.card_text,
                  base_model=base, title=title, load_ref=ref, command=command, version=version,
                  bytes_in=bytes_in, bytes_out=bytes_out, dequant_counts=dequant_counts)
    path = folder / CARD_NAME
    path.write_text(text, encoding="utf-8")
    return path
