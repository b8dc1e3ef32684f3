"""verify's checks of everything but tensor data: config, shard layout, index, other files, manifest.

Each function appends :class:`~streamfold.check.report.Problem` s to ``problems`` and returns what
the later checks need. The tensor data itself is checked by :mod:`streamfold.check.taskcheck`.
"""
from __future__ import annotations

import filecmp
import json
from pathlib import Path

import numpy as np

from .checkrun import Reader
from ..core.errors import StreamfoldError
from ..core.files import FLASHNORM_VERSION, other_files
from ..core.manifest import MANIFEST_NAME, OrderedHasher, hash_file, list_files, parse_manifest
from ..planning.planner import MODES, Kind, Plan
from ..core.reader import INDEX_NAME, SINGLE_NAME, Checkpoint, SafetensorsFile, TensorInfo, read_config
from ..planning.tasks import Task
from .report import Problem

Shards = dict[str, "SafetensorsFile | None"]  # output shard -> its parsed header (None: unreadable)


def check_config(dst: Path, src_cfg: dict, problems: list[Problem]) -> dict | None:
    """``config.json``: the FlashNorm flags, and otherwise the source's; returns it (None: unreadable)."""
    def fail(msg: str) -> None:
        problems.append(Problem("config", "config.json", msg))
    try:
        cfg = read_config(dst)
    except StreamfoldError as e:
        fail(str(e).replace(f"{dst / 'config.json'}: ", ""))
        return None
    if cfg.get("flashnorm") is not True:
        fail(f"\"flashnorm\" is {cfg.get('flashnorm')!r}, expected true")
    if cfg.get("flashnorm_version") != FLASHNORM_VERSION:
        fail(f"\"flashnorm_version\" is {cfg.get('flashnorm_version')!r}, expected {FLASHNORM_VERSION}")
    if cfg.get("flashnorm_mode") not in MODES:
        fail(f"\"flashnorm_mode\" is {cfg.get('flashnorm_mode')!r}, expected one of {', '.join(MODES)}")
    for key in sorted(set(src_cfg) | set(cfg)):
        if key.startswith("flashnorm"):  # the flags convert adds
            continue
        if key not in cfg:
            fail(f"key {key!r} of the source config is missing")
        elif key not in src_cfg:
            fail(f"key {key!r} is not in the source config")
        elif cfg[key] != src_cfg[key]:
            fail(f"key {key!r} is {json.dumps(cfg[key])[:80]}, the source has {json.dumps(src_cfg[key])[:80]}")
    return cfg


def open_shards(dst: Path, src_ckpt: Checkpoint, problems: list[Problem]) -> tuple[Shards, dict[str, str],
                                                                                   dict[str, TensorInfo]]:
    """The output shards the source's imply (headers parsed), and where each output tensor is."""
    files: Shards = {}
    for shard in src_ckpt.shards:
        path = dst / shard
        if not path.is_file():
            problems.append(Problem("layout", shard, "shard file is missing"))
            continue
        try:
            files[shard] = SafetensorsFile(path)
        except StreamfoldError as e:
            problems.append(Problem("layout", shard, str(e).replace(f"{path}: ", "") or "unreadable"))
            files[shard] = None
    for p in sorted(dst.glob("*.safetensors")):
        if p.name not in src_ckpt.shards:
            problems.append(Problem("layout", p.name, "unexpected weight file (the source has no such shard)"))
    where: dict[str, str] = {}
    tensors: dict[str, TensorInfo] = {}
    for shard, f in files.items():
        for name, t in (f.tensors.items() if f is not None else ()):
            if name in where:
                problems.append(Problem("layout", name, f"in both {where[name]} and {shard}"))
            else:
                where[name], tensors[name] = shard, t
    return files, where, tensors


def _what(kind: Kind, a) -> str:
    return {Kind.COPY: "unchanged", Kind.SCALE: f"folded with {a.norm.weight if a.norm else '?'}",
            Kind.FILL: "folded norm set to identity", Kind.BIAS: "bias with the norm's shift folded in",
            Kind.DROP: "removed", Kind.DEQUANT: "dequantized" + (f" and folded with {a.norm.weight}" if a.norm else "")}[kind]


def check_layout(plan: Plan, src_ckpt: Checkpoint, files: Shards, where: dict[str, str],
                 tensors: dict[str, TensorInfo], problems: list[Problem], counts: dict[str, int]) -> set[str]:
    """Every planned tensor present where the source has it, with the planned dtype and shape;
    returns the tensors whose data can be checked (``counts["absent"]``: strict mode's dropped norms)."""
    def fail(check: str, subject: str, msg: str) -> None:
        problems.append(Problem(check, subject, msg))
    checkable: set[str] = set()
    lost: dict[str, list[str]] = {}
    widened_aux = ({x for qm in plan.dequant.widened.values() for x in qm.tensors if x != qm.weight}
                   if plan.dequant is not None else set())
    for name, a in plan.actions.items():
        st = src_ckpt.tensors[name]
        if a.kind == Kind.DROP:
            scale = name in widened_aux
            if name in tensors:
                fail("tensor", name, "scale of a dequantized weight must be absent, but is present" if scale
                     else "folded norm must be absent in strict mode, but is present")
            else:
                counts["scales_dropped" if scale else "absent"] += 1
            continue
        if name not in tensors:
            shard = src_ckpt.shard_of[name]
            if files.get(shard) is None:  # the shard is missing or unreadable: reported once, below
                lost.setdefault(shard, []).append(name)
            else:
                fail("tensor", name, f"missing (expected in {shard}, {_what(a.kind, a)})")
            continue
        dt = tensors[name]
        if where[name] != src_ckpt.shard_of[name]:
            fail("layout", name, f"in {where[name]}, the source has it in {src_ckpt.shard_of[name]}")
        if dt.dtype != a.out_dtype or dt.shape != st.shape:
            fail("tensor", name, f"is {dt.dtype} {list(dt.shape)}, expected {a.out_dtype} {list(st.shape)} "
                                 f"({_what(a.kind, a)})")
            continue
        checkable.add(name)
    for shard, names in lost.items():
        fail("tensor", shard, f"{len(names)} tensors missing with this shard: "
                              f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}")
    added = {t.name: t for t in plan.added}  # identity norms a mode change restores
    for name in sorted(set(tensors) - set(plan.actions) - set(added)):
        fail("tensor", name, "not in the source checkpoint")
    for name, t in added.items():
        dt = tensors.get(name)
        if dt is None or where[name] != t.shard or dt.dtype != t.dtype or dt.shape != tuple(t.shape):
            got = "missing" if dt is None else f"{dt.dtype} {list(dt.shape)} in {where[name]}"
            fail("tensor", name, f"restored identity norm is {got}, expected {t.dtype} {list(t.shape)} in {t.shard}")
        else:
            checkable.add(name)
    for shard, f in files.items():
        if f is not None and f.metadata != src_ckpt.shards[shard].metadata:
            fail("layout", shard, f"header __metadata__ {f.metadata} differs from the source's "
                                  f"{src_ckpt.shards[shard].metadata}")
    return checkable


def check_headers(tasks: list[Task], files: Shards, reader: Reader, problems: list[Problem]) -> None:
    """Each output header is byte for byte the one its task lays out. Differences the tensor checks
    already name (a tensor missing, added, of another dtype or shape, other metadata) are not
    reported again; what is left is the order of the tensors, the JSON spelling or the padding."""
    for task in tasks:
        f = files.get(task.shard)
        if f is None:
            continue
        want = task.layout().header
        got = np.empty(f.header_size, np.uint8)
        reader.read(f.path, 0, got)
        if got.tobytes() == want:
            continue
        planned = [(n, dt, tuple(sh)) for n, dt, sh in task.tensors]
        present = [(t.name, t.dtype, t.shape) for t in f.tensors.values()]  # file order
        if sorted(planned) != sorted(present) or f.metadata != task.metadata:
            continue
        what = "tensors in another order" if planned != present else "same tensors, offsets and metadata"
        problems.append(Problem("layout", task.shard, f"header is not byte for byte the planned one ({what}; "
                                                      f"{f.header_size} bytes, planned {len(want)})"))


def check_index(dst: Path, src_ckpt: Checkpoint, files: Shards, where: dict[str, str],
                problems: list[Problem]) -> None:
    """The index lists every output tensor in the shard holding it, and the shards' total size."""
    def fail(subject: str, msg: str) -> None:
        problems.append(Problem("index", subject, msg))
    path = dst / INDEX_NAME
    if not src_ckpt.sharded:
        if path.exists():
            fail(INDEX_NAME, f"present, but the source is a single {SINGLE_NAME}")
        return
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        wm = index["weight_map"]
        if not isinstance(wm, dict):
            raise TypeError
    except FileNotFoundError:
        fail(INDEX_NAME, "missing (the source is sharded)")
        return
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        fail(INDEX_NAME, "not a valid index (needs a \"weight_map\")")
        return
    unreadable = {s for s in src_ckpt.shards if files.get(s) is None}  # already reported
    for name, shard in sorted(wm.items()):
        if shard in unreadable and name not in where:
            continue
        if name not in where:
            fail(name, f"{INDEX_NAME} places it in {shard}, but no shard holds it (stale index)")
        elif where[name] != shard:
            fail(name, f"{INDEX_NAME} places it in {shard}, but it is in {where[name]} (stale index)")
    for name in sorted(set(where) - set(wm)):
        fail(name, f"in {where[name]} but not listed in {INDEX_NAME} (stale index)")
    total = (index.get("metadata") or {}).get("total_size")
    actual = sum(f.tensors[n].nbytes for f in files.values() if f is not None for n in f.tensors)
    if total is not None and all(f is not None for f in files.values()) and total != actual:
        fail(INDEX_NAME, f"metadata total_size is {total}, the shards hold {actual} bytes")


def check_other_files(src: Path, dst: Path, src_ckpt: Checkpoint, problems: list[Problem]) -> int:
    """The source's other files are in the output unchanged, and no other weight format of the
    unfolded model is; returns how many files matched."""
    files, skipped = other_files(src, set(src_ckpt.shards))  # the card is convert's own
    same = 0
    for rel in files:
        d = dst / rel
        if not d.is_file():
            problems.append(Problem("files", rel.as_posix(), "missing (the source has it)"))
        elif not filecmp.cmp(src / rel, d, shallow=False):
            problems.append(Problem("files", rel.as_posix(), "differs from the source's copy"))
        else:
            same += 1
    for rel in skipped:
        if (dst / rel).exists():
            problems.append(Problem("files", rel, "another weight format of the unfolded source model is in the "
                                                  "output (it would load unfolded); remove it"))
    return same


def manifest_hashers(dst: Path, files: Shards, problems: list[Problem]
                     ) -> tuple[dict[str, str] | None, dict[str, OrderedHasher]]:
    """``SHA256SUMS`` entries (None: no manifest), and a hasher for each listed shard, to be fed by
    the tensor checks' reads (listed before reading, so each shard is read once)."""
    path = dst / MANIFEST_NAME
    if not path.is_file():
        return None, {}
    entries, bad_lines = parse_manifest(path)
    for msg in bad_lines:
        problems.append(Problem("manifest", MANIFEST_NAME, msg.replace(f"{MANIFEST_NAME}", "").strip(": ")))
    return entries, {s: OrderedHasher((dst / s).stat().st_size) for s in files if s in entries}


def check_manifest(dst: Path, entries: dict[str, str], hashers: dict[str, OrderedHasher],
                   problems: list[Problem]) -> tuple[str, int]:
    """Every file listed with its digest, nothing unlisted: ``("ok" | "failed", bytes read here)``."""
    before, nbytes = len(problems), 0
    present = set(list_files(dst))
    for rel in sorted(set(entries) | present):
        if rel not in entries:
            problems.append(Problem("manifest", rel, f"not listed in {MANIFEST_NAME}"))
            continue
        if rel not in present:
            problems.append(Problem("manifest", rel, f"listed in {MANIFEST_NAME} but missing"))
            continue
        if rel in hashers:
            h = hashers[rel]
            got = h.hexdigest()
            if got is None:
                problems.append(Problem("manifest", rel, f"could not be hashed ({h.broken or 'incomplete read'})"))
                continue
        else:
            nbytes += (dst / rel).stat().st_size
            got = hash_file(dst / rel)
        if got != entries[rel]:
            problems.append(Problem("manifest", rel, f"sha256 {got[:16]}... does not match {MANIFEST_NAME} "
                                                     f"({entries[rel][:16]}...)"))
    return ("ok" if len(problems) == before else "failed"), nbytes
