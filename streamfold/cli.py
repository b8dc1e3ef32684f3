"""Command line: ``python -m streamfold SRC DST`` and the ``inspect`` / ``verify`` / ``demo`` subcommands.

Exit status: 0 success, 2 bad input or a failed check (one line on stderr, no traceback),
3 verification found problems (``verify``, or ``convert --verify``; one line per problem),
4 SRC is already a FlashNorm checkpoint and nothing was written (one line on stderr; ``--json`` also
prints its state on stdout), 1 an internal error, 130 interrupted (SIGINT), 143 terminated (SIGTERM),
141 stdout closed early (``... --json | head``: a tool killed by SIGPIPE's status, nothing on stderr).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
from typing import Callable, Sequence

from .core.version import __version__
from .core.errors import EXIT_ALREADY_FLASHNORM, EXIT_NOTHING_TO_FOLD, AlreadyFlashNorm, NothingToFold, StreamfoldError
from .run.staging import Terminated, handle_sigterm

EXAMPLES = """\
examples:
  python -m streamfold ./Llama-3.2-1B ./Llama-3.2-1B-FlashNorm
  python -m streamfold ./model ./out --mode strict --merged-dtype float32
  python -m streamfold inspect ./model            # the fold plan, from headers only
  python -m streamfold ./model --dry-run --json   # the same, machine-readable
  python -m streamfold demo                       # convert and check the bundled sample
  python -m streamfold verify ./model ./out       # prove ./out is ./model folded (exit 3 if not)
  python -m streamfold verify ./model ./out --forward --json   # + numpy logits comparison, for CI
  python -m streamfold ./model ./out --verify     # convert, then verify
  python -m streamfold ./model-FlashNorm ./out --mode strict   # an already-FlashNorm SRC: change its mode

Hugging Face Hub (SRC may be a repo id org/name; a local path of that name wins):
  python -m streamfold HuggingFaceTB/SmolLM2-135M ./SmolLM2-135M-FlashNorm
  python -m streamfold Qwen/Qwen3-8B ./Qwen3-8B-FlashNorm --revision main --merged-dtype float32
  python -m streamfold inspect meta-llama/Llama-3.2-1B   # plan + sizes from remote headers, no download
  python -m streamfold HuggingFaceTB/SmolLM2-135M ./out --push-to-hub me/SmolLM2-135M-FlashNorm --private
  HF_HUB_OFFLINE=1 python -m streamfold HuggingFaceTB/SmolLM2-135M ./out   # from the local cache only

  Only the safetensors shards, the index, config.json, tokenizer and other small files are downloaded
  (never *.bin / *.pth / consolidated.* / original/ duplicates), into huggingface_hub's cache.
  Environment: HF_HOME or HF_HUB_CACHE (cache location), HF_HUB_OFFLINE=1 (cache only, no network),
  HF_TOKEN (private or gated repos, and --push-to-hub; or run `hf auth login`).
  DST always gets a model card, README.md (base_model, license, tags, what changed, how to load it).

exit status: 0 ok, 1 internal error, 2 bad input (one line: streamfold: error: ...), 3 verification
  found problems, 4 SRC is already a FlashNorm checkpoint (config.json flags, or every foldable norm
  the identity or absent): nothing written, unless --mode asks for the other mode; 5 nothing to fold:
  the architecture has no foldable norm (one line: ...: nothing to fold: every norm ...), nothing
  written; an encoder or encoder-decoder model_type is bad input (2); 130 interrupted.
"""

VERIFY_PROVES = """\
Re-plans SRC with the same planner and rules convert uses, then reads both checkpoints once and checks:
every unchanged tensor byte-identical; every folded element bit-identical to the exact product
source x norm rounded once to its stored dtype (recomputed independently of the fold kernel); folded
norms identity (compat) or absent (strict); folded LayerNorm biases bit-identical to b + W @ beta rounded once;
config flags, shard layout, index, other files and SHA256SUMS.

A pass proves DST is this plan executed exactly on SRC. It does not prove the plan is right for the
model (that each folded norm feeds only the linears folded with it). --forward tests that end to end
for the decoders streamfold's numpy forward pass supports (float32 logits of SRC and DST compared: a
wrong plan shows, a last-bit rounding does not); the transformers test suite
(tests/test_architectures.py) proves it for every supported family on small random models."""

SUBCOMMANDS = ("convert", "inspect", "verify", "demo", "derive-rules")


def parse_size(text: str) -> int:
    """``"256M"``, ``"1.5G"``, ``"64MiB"`` or a byte count -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 256M or 2G)")
    mult = 1024 ** "kmgt".index(m.group(2).lower()) * 1024 if m.group(2) else 1
    return int(float(m.group(1)) * mult)


def merged_dtype(text: str) -> str:
    """``--merged-dtype``: source, float32 (fp32, f32) or bf16 (bfloat16), case-insensitive."""
    from .planning.planner import MERGED_ALIASES
    got = MERGED_ALIASES.get(text.lower())
    if got is None:
        raise argparse.ArgumentTypeError(f"not a merged dtype: {text!r} (use source, float32/fp32/f32 or "
                                         "bf16/bfloat16)")
    return got


MERGED_HELP = ("dtype of folded weights: source (default), the source's, rounded once; float32 (also fp32, f32): "
               "no rounding; bf16 (also bfloat16): the same as source for a bf16 source, refused for other "
               "sources (weights are never narrowed)")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text!r}")
    return int(text)


def _plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=("compat", "strict"), default=None,
                   help="compat (default): folded norms kept as identity, loads in stock transformers "
                        "and vLLM; strict: folded norms removed. For an already-FlashNorm SRC: the mode to "
                        "change it to (default: none, exit 4)")
    p.add_argument("--merged-dtype", type=merged_dtype, default=None, metavar="{source,float32,bf16}",
                   help=MERGED_HELP + " (float32 is refused for an already-FlashNorm SRC)")
    p.add_argument("--rules", metavar="FILE",
                   help="JSON or TOML rules (norm -> consumers) for an architecture streamfold does not know")
    p.add_argument("--dequantize", nargs="?", const="consumers", choices=("consumers", "all"), default=None,
                   help="a quantized SRC (FP8 block so far): decode the quantized consumers of folded norms (and "
                        "their fused siblings) to bf16 (float32 with --merged-dtype float32), each element the "
                        "exact q*s*g rounded once; 'all': every quantized weight")
    p.add_argument("--fold-vision", action="store_true", help="fold the vision tower too (config.json: flashnorm_vision)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--all", action="store_true",
                   help="with inspect / --plan: list every norm and its consumer tensors, not just families")
    p.add_argument("--revision", metavar="REV",
                   help="branch, tag or commit of a Hub repo id SRC (default: main)")


WORKERS_CONVERT = ("threads: one writes, the others fold ahead (default: CPU count, at most 8; 1 runs everything "
                   "in order on one thread)")
WORKERS_VERIFY = "threads reading and checking both checkpoints (default: CPU count, at most 8)"


def _resource_options(p: argparse.ArgumentParser, workers_help: str = WORKERS_CONVERT) -> None:
    p.add_argument("--workers", type=_positive, default=None, help=workers_help)
    p.add_argument("--memory-budget", type=parse_size, default=None, metavar="SIZE",
                   help="buffer memory for all threads, e.g. 64M or 1G (default 96M)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m streamfold",
        description="Fold normalization weights into the linear layers that read them (FlashNorm), "
                    "streaming a safetensors checkpoint with flat memory and no torch.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"streamfold {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{convert,inspect,verify,demo,derive-rules}")

    c = sub.add_parser("convert", help="convert SRC into a FlashNorm checkpoint at DST (the default)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("src", metavar="SRC", help="checkpoint folder (index + shards, or model.safetensors), "
                                              "or a Hub repo id org/name")
    c.add_argument("dst", metavar="DST", nargs="?", help="output folder (created; must not exist or be empty)")
    _plan_options(c)
    c.add_argument("--dry-run", "--plan", dest="plan", action="store_true",
                   help="print the fold plan and output sizes and exit; writes nothing (reads headers only)")
    c.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    _resource_options(c)
    c.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run one Ray task per output shard (pip install \"streamfold[ray]\"): join the cluster "
                        "at ADDRESS, or start a local one; source and DST's folder must be on storage every "
                        "node sees (from a Hub repo id: only DST's folder; each task downloads its own source "
                        "shards). Each task uses --workers CPUs (default 2) and --memory-budget")
    res = c.add_mutually_exclusive_group()
    res.add_argument("--resume", dest="resume", action="store_true", default=True,
                     help="continue an interrupted conversion into DST, re-using its completed shards after "
                          "checking them (the default: the same command resumes; a changed source or option "
                          "starts fresh and says why)")
    res.add_argument("--no-resume", dest="resume", action="store_false",
                     help="discard an interrupted conversion's completed shards and start fresh")
    c.add_argument("--stream", action="store_true",
                   help="with a Hub repo id SRC and --push-to-hub: fetch, convert, upload and delete one shard "
                        "at a time (peak disk a few shards), one commit at the end; DST keeps the small files. "
                        "With --ray: one Ray task per shard does this on its worker")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    c.add_argument("--verify", action="store_true",
                   help="verify the output tensor by tensor right after converting (exit 3 on problems; "
                        "nothing is pushed then)")
    c.add_argument("--manifest", action="store_true",
                   help="also write SHA256SUMS (sha256sum -c format; verify checks it). Hashed while "
                        "writing, but sha256 of every byte costs about as much CPU as the fold itself")
    hub = c.add_argument_group("model card and Hub upload")
    hub.add_argument("--base-model", metavar="REPO",
                     help="base_model for the model card (default: the source repo id, when known)")
    hub.add_argument("--push-to-hub", metavar="REPO",
                     help="after converting, upload DST to this model repo in one commit (created if "
                          "needed) and print its URL; needs HF_TOKEN or `hf auth login`")
    hub.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    hub.add_argument("--commit-message", metavar="MSG", help="with --push-to-hub: the commit message")

    i = sub.add_parser("inspect", help="print the fold plan and output sizes for SRC from headers only "
                                       "(a Hub repo id: remote headers, no weights downloaded)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("src", metavar="SRC", help="checkpoint folder or Hub repo id org/name")
    _plan_options(i)

    v = sub.add_parser("verify", help="check that DST is a correct FlashNorm conversion of SRC (no torch); "
                                      "exit 0 if so, 3 if not", description=VERIFY_PROVES,
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("src", metavar="SRC", help="the source checkpoint folder (or Hub repo id)")
    v.add_argument("dst", metavar="DST", help="the converted checkpoint folder")
    v.add_argument("--forward", action="store_true",
                   help="also run a float32 numpy forward pass of both on a short token sequence and "
                        "compare the logits (max/relative error, cosine, argmax agreement)")
    v.add_argument("--tokens", metavar="IDS",
                   help="with --forward: comma-separated token ids, or a count of fixed pseudo-random ids "
                        "(default 16)")
    v.add_argument("--mode", choices=("compat", "strict"), default=None,
                   help="expected mode (default: what DST's config.json declares)")
    v.add_argument("--merged-dtype", type=merged_dtype, default=None, metavar="{source,float32,bf16}",
                   help="expected merged dtype, spelled as for convert (default: read from DST's folded tensors)")
    v.add_argument("--rules", metavar="FILE", help="the rules file the conversion used, if any")
    v.add_argument("--dequantize", nargs="?", const="consumers", choices=("consumers", "all"), default=None,
                   help="the conversion used --dequantize (default: read from DST's config.json)")
    v.add_argument("--fold-vision", action="store_true", default=None, help="expect the vision tower folded too")
    v.add_argument("--revision", metavar="REV", help="branch, tag or commit of a Hub repo id SRC")
    _resource_options(v, WORKERS_VERIFY)
    v.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    v.add_argument("-q", "--quiet", action="store_true", help="no progress bar; print only the problems (nothing when all is well)")

    d = sub.add_parser("demo", help="convert the bundled sample checkpoint as a default conversion does, "
                                    "verify it, and compare with --merged-dtype float32")
    d.add_argument("dst", metavar="DST", nargs="?",
                   help="where to write it (kept; must not exist or be empty) (default: a temporary folder, "
                        "removed at the end)")
    d.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    d.add_argument("-q", "--quiet", action="store_true")

    r = sub.add_parser("derive-rules", help="derive and check a --rules file (TOML, on stdout) for a model folder "
                                            "or model_type from transformers' computation (needs the derive "
                                            "extra: torch + transformers)")
    r.add_argument("target", metavar="MODEL_DIR_OR_TYPE", help="a model folder with config.json, or a model_type")
    return parser


def _progress(quiet: bool, desc: str = "folding") -> Callable[[int], Callable[[int], None]] | None:
    if quiet:
        return None
    from tqdm import tqdm

    def start(total: int) -> Callable[[int], None]:
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                   file=sys.stderr, leave=False, dynamic_ncols=True, disable=None)  # None: off when not a TTY
        _BARS.append(bar)

        def update(n: int) -> None:
            bar.update(n)
            if bar.n >= total:
                bar.close()
        return update
    return start


_BARS: list = []


def _close_bars() -> None:
    """Clear progress bars, so an error or the summary starts on a clean line."""
    while _BARS:
        _BARS.pop().close()


def _print_plan(args) -> int:
    from .inspection import inspect
    found = inspect(args.src, mode=args.mode, merged_dtype=args.merged_dtype, rules=args.rules,
                    revision=args.revision, dequantize=args.dequantize, fold_vision=args.fold_vision)
    print(json.dumps(found.to_dict(), indent=2) if args.json else found.describe(args.all))
    return 0


def _convert(args) -> int:
    if args.plan:
        return _print_plan(args)
    if args.dst is None:
        raise StreamfoldError("convert needs a destination: python -m streamfold SRC DST (or --plan)")
    if (args.private or args.commit_message) and not args.push_to_hub:
        raise StreamfoldError("--private and --commit-message apply to --push-to-hub REPO")
    from .convert import convert
    report = convert(args.src, args.dst, log=_log(args.quiet), mode=args.mode, merged_dtype=args.merged_dtype,
                     overwrite=args.overwrite, workers=args.workers, memory_budget=args.memory_budget,
                     rules=args.rules, progress=_progress(args.quiet or args.json), revision=args.revision,
                     base_model=args.base_model, push_to_hub=args.push_to_hub, private=args.private,
                     commit_message=args.commit_message, manifest=args.manifest, verify=args.verify,
                     executor="local" if args.ray is None else "ray", ray_address=args.ray or None,
                     stream=args.stream, resume=args.resume, dequantize=args.dequantize, fold_vision=args.fold_vision)
    v = report.verification
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    elif not args.quiet:
        print(report.summary())
        if v is not None:
            print(v.summary())
    elif report.hub_url:
        print(report.hub_url)
    if v is not None and not v.ok:
        if args.quiet and not args.json:
            _print_problems(v)
        if args.push_to_hub:
            print("streamfold: verification failed; not pushed", file=sys.stderr)
        return 3
    return 0


def _print_problems(report) -> None:
    for p in report.problems:
        print(f"streamfold: verify: {p}", file=sys.stderr)


def _tokens(text: str | None):
    if text is None:
        return None
    parts = [t.strip() for t in text.split(",") if t.strip()]
    if len(parts) == 1 and parts[0].isdigit() and "," not in text:
        return int(parts[0])
    if not parts or not all(p.isdigit() for p in parts):
        raise StreamfoldError(f"--tokens takes comma-separated token ids or a count, not {text!r}")
    return [int(p) for p in parts]


def _verify(args) -> int:
    from .hub.source import resolve_source
    from .check.verify import verify
    tokens = _tokens(args.tokens)
    src = resolve_source(args.src, revision=args.revision, quiet=args.quiet or args.json).path
    report = verify(src, args.dst, mode=args.mode, merged_dtype=args.merged_dtype, rules=args.rules,
                    dequantize=args.dequantize, fold_vision=args.fold_vision,
                    workers=args.workers, memory_budget=args.memory_budget, forward=args.forward,
                    forward_tokens=tokens, progress=_progress(args.quiet or args.json, "verifying"))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    elif args.quiet:
        _print_problems(report)
    else:
        print(report.summary())
    return 0 if report.ok else 3


def _log(quiet: bool) -> Callable[[str], None]:
    """Where one-line notes (a killed run's output reclaimed) go: stderr, unless --quiet."""
    def log(line: str) -> None:
        if not quiet:
            _close_bars()
            print(line, file=sys.stderr)
    return log


def _demo(args) -> int:
    from .demo import run_demo
    return run_demo(args.dst, quiet=args.quiet, overwrite=args.overwrite, log=_log(args.quiet))


def _derive_rules(args) -> int:
    from .derive.command import derive_rules
    return derive_rules(args.target)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in SUBCOMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "convert")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    writes = args.command in ("convert", "demo") and not getattr(args, "plan", False)
    cleaned = "; partial output removed" if writes else ""
    try:
        if threading.current_thread() is threading.main_thread():
            handle_sigterm()
        handler = {"convert": _convert, "inspect": _print_plan, "verify": _verify, "demo": _demo,
                   "derive-rules": _derive_rules}[args.command]
        code = handler(args)
        sys.stdout.flush()  # here, so a closed pipe is seen below and not at interpreter exit
        return code
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as Unix tools do
        _close_bars()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing left to flush into the closed pipe at exit
        os.close(devnull)
        return 141
    except AlreadyFlashNorm as e:  # not an error: nothing to do (exit 4, testable by pipelines)
        _close_bars()
        if getattr(args, "json", False):
            print(json.dumps({"already_flashnorm": True, "message": str(e), **e.state.to_dict()}, indent=2))
        print(f"streamfold: {e}", file=sys.stderr)
        return EXIT_ALREADY_FLASHNORM
    except StreamfoldError as e:  # NothingToFold: not an error either (exit 5); StreamVerifyFailed: exit 3
        _close_bars()
        nothing = isinstance(e, NothingToFold)
        print(f"streamfold: {'' if nothing else 'error: '}{e}", file=sys.stderr)
        return EXIT_NOTHING_TO_FOLD if nothing else 3 if type(e).__name__ == "StreamVerifyFailed" else 2
    except KeyboardInterrupt:
        _close_bars()
        print(f"streamfold: interrupted{cleaned}", file=sys.stderr)
        return 130
    except Terminated:
        _close_bars()
        print(f"streamfold: terminated (SIGTERM){cleaned}", file=sys.stderr)
        return 143
    except Exception as e:  # an unexpected failure still gets one line, not a traceback
        _close_bars()
        if os.environ.get("STREAMFOLD_DEBUG"):
            raise
        print(f"streamfold: internal error: {type(e).__name__}: {e} (set STREAMFOLD_DEBUG=1 for a "
              "traceback and please report it)", file=sys.stderr)
        return 1
