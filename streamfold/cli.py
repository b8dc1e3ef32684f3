"""Command line: ``python -m streamfold SRC DST`` and the ``inspect`` / ``demo`` subcommands.

Exit status: 0 success, 2 bad input or a failed check (one line on stderr, no traceback),
1 an internal error, 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Callable, Sequence

from . import __version__
from .errors import StreamfoldError

EXAMPLES = """\
examples:
  python -m streamfold ./Llama-3.2-1B ./Llama-3.2-1B-FlashNorm
  python -m streamfold ./model ./out --mode strict --merged-dtype float32
  python -m streamfold inspect ./model            # the fold plan, from headers only
  python -m streamfold ./model --plan --json      # the same, machine-readable
  python -m streamfold demo                       # convert and check the bundled sample
"""

SUBCOMMANDS = ("convert", "inspect", "demo")


def parse_size(text: str) -> int:
    """``"256M"``, ``"1.5G"``, ``"64MiB"`` or a byte count -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 256M or 2G)")
    mult = 1024 ** "kmgt".index(m.group(2).lower()) * 1024 if m.group(2) else 1
    return int(float(m.group(1)) * mult)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text!r}")
    return int(text)


def _plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=("compat", "strict"), default="compat",
                   help="compat (default): folded norms kept as identity, loads in stock transformers "
                        "and vLLM; strict: folded norms removed")
    p.add_argument("--merged-dtype", choices=("source", "float32"), default="source",
                   help="dtype of folded weights: the source's (default) or float32 (no rounding)")
    p.add_argument("--rules", metavar="FILE",
                   help="JSON or TOML rules (norm -> consumers) for an architecture streamfold does not know")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m streamfold",
        description="Fold normalization weights into the linear layers that read them (FlashNorm), "
                    "streaming a safetensors checkpoint with flat memory and no torch.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"streamfold {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{convert,inspect,demo}")

    c = sub.add_parser("convert", help="convert SRC into a FlashNorm checkpoint at DST (the default)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("src", metavar="SRC", help="checkpoint folder (index + shards, or model.safetensors)")
    c.add_argument("dst", metavar="DST", nargs="?", help="output folder (created; must not exist or be empty)")
    _plan_options(c)
    c.add_argument("--plan", action="store_true", help="print the fold plan and exit (reads headers only)")
    c.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    c.add_argument("--workers", type=_positive, default=None,
                   help="worker threads (default: CPU count, at most 8)")
    c.add_argument("--memory-budget", type=parse_size, default=None, metavar="SIZE",
                   help="buffer memory for all workers, e.g. 64M or 1G (default 96M)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")

    i = sub.add_parser("inspect", help="print the fold plan for SRC from headers only")
    i.add_argument("src", metavar="SRC")
    _plan_options(i)

    d = sub.add_parser("demo", help="convert the bundled sample checkpoint and check the result is exact")
    d.add_argument("dst", metavar="DST", nargs="?", help="where to write it (default: a temporary folder)")
    d.add_argument("-q", "--quiet", action="store_true")
    return parser


def _progress(quiet: bool) -> Callable[[int], Callable[[int], None]] | None:
    if quiet:
        return None
    from tqdm import tqdm

    def start(total: int) -> Callable[[int], None]:
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="folding",
                   file=sys.stderr, leave=False, dynamic_ncols=True)
        return bar.update
    return start


def _print_plan(args) -> int:
    from .convert import load_plan
    ckpt, _, plan = load_plan(args.src, mode=args.mode, merged_dtype=args.merged_dtype, rules=args.rules)
    ckpt.close()
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.describe())
    return 0


def _convert(args) -> int:
    if args.plan:
        return _print_plan(args)
    if args.dst is None:
        raise StreamfoldError("convert needs a destination: python -m streamfold SRC DST (or --plan)")
    from .convert import convert
    report = convert(args.src, args.dst, mode=args.mode, merged_dtype=args.merged_dtype,
                     overwrite=args.overwrite, workers=args.workers, memory_budget=args.memory_budget,
                     rules=args.rules, progress=_progress(args.quiet or args.json))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    elif not args.quiet:
        print(report.summary())
    return 0


def _demo(args) -> int:
    from .demo import run_demo
    return run_demo(args.dst, quiet=args.quiet)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in SUBCOMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "convert")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        handler = {"convert": _convert, "inspect": _print_plan, "demo": _demo}[args.command]
        return handler(args)
    except StreamfoldError as e:
        print(f"streamfold: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("streamfold: interrupted; no output was written", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure still gets one line, not a traceback
        if os.environ.get("STREAMFOLD_DEBUG"):
            raise
        print(f"streamfold: internal error: {type(e).__name__}: {e} (set STREAMFOLD_DEBUG=1 for a "
              "traceback and please report it)", file=sys.stderr)
        return 1
