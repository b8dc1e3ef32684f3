"""``--dequantize`` through every path a user runs: the model card's counts, ``--json``, ``verify``'s recount,
the reproduce command, resume, Ray, and the Hub ``--stream`` path.

The source is the tiny FP8 block Qwen3 of tests/test_dequantize.py (norms far from the identity, norms,
codes and scales in different shards). The counts of exact vs rounded elements are checked against a count
made here with torch: the exact ``q·s·g`` in float64 (4 + 24 + 24 significant bits: exact) compared with
the stored value widened to float64 -- neither the converter's counter (decode.py + numpy) nor ``verify``'s
integer oracle.
"""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from tests import quant_models as qm
from streamfold.run.journal import JOURNAL
from tests.test_dequantize import WIDENED
from tests.test_quant_partial import QWEN3, cli, read_all
from tests.test_resume import KILLER, staging_path
from tests.test_tasks import _env, _files


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8") / "qwen3-fp8"
    path.mkdir()
    qm.fp8_block("qwen3", path, **QWEN3)
    return path


def torch_counts(src, dst) -> dict[str, list[int]]:
    """Per widened tensor, [exact, rounded]: exact where the stored value IS the float64 product q·s·g."""
    s, d = read_all(src), read_all(dst)
    out = {}
    for name, norm in WIDENED.items():
        q = s[name].to(torch.float64)
        scale = s[name.replace(".weight", ".weight_scale_inv")].to(torch.float64)
        rows, cols = q.shape
        full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
        exact = q * full * s[norm].to(torch.float32).to(torch.float64)[None, :]
        n = int(((d[name].to(torch.float64) == exact) & torch.isfinite(exact)).sum())
        out[name] = [n, exact.numel() - n]
    return out


CARD_LINE = re.compile(r"^- dequantized elements: (\d+) \((\d+) exact, (\d+) rounded once\)$", re.M)


def card_counts(card: bytes) -> tuple[int, int, int]:
    m = CARD_LINE.search(card.decode())
    assert m is not None, card
    return tuple(map(int, m.groups()))


@pytest.fixture(scope="module")
def out_bf16(src, tmp_path_factory):
    import streamfold
    dst = tmp_path_factory.mktemp("deq") / "bf16"
    report = streamfold.convert(src, dst, dequantize=True)  # in-process; the CLI's --json prints to_dict()
    return dst, json.loads(json.dumps(report.to_dict()))


def test_counts_on_card_json_and_verify(src, out_bf16, tmp_path):
    dst, report = out_bf16
    want = torch_counts(src, dst)
    assert report["dequant_counts"] == want
    e, r = sum(v[0] for v in want.values()), sum(v[1] for v in want.values())
    assert 0 < e < r  # both kinds occur: the count can be wrong either way
    assert (report["dequant_exact"], report["dequant_rounded"]) == (e, r)
    card = (dst / "README.md").read_text()
    m = CARD_LINE.search(card)
    assert m and tuple(map(int, m.groups())) == (e + r, e, r), card
    assert f"{e} are exact" in card and f"{r} were rounded once" in card
    assert "python -m streamfold qwen3-fp8 ./bf16 --dequantize\n" in card  # the reproduce command
    import streamfold
    v = streamfold.verify(src, dst)  # in-process (the CLI's --json prints this report's to_dict)
    assert v.ok, v.summary()
    assert (v.to_dict()["counts"]["dequant_exact"], v.counts["dequant_rounded"]) == (e, r)
    # a card whose counts do not match verify's recount fails, naming the card
    bad = tmp_path / "bad"
    shutil.copytree(dst, bad)
    (bad / "README.md").write_text(card.replace(f"({e} exact, {r} rounded once)", f"({e + 1} exact, {r - 1} "
                                                                                   "rounded once)"))
    v = streamfold.verify(src, bad)
    assert [str(p) for p in v.problems] == [f"README.md: states {e + 1} exact and {r - 1} rounded dequantized "
                                            f"elements; recounted: dequantized elements: {e + r} ({e} exact, {r} "
                                            "rounded once)"]


def _killed_after_shards(src, dst, n: int, *args) -> None:
    """The CLI SIGKILLed right after its ``n``-th shard is journaled (the kill injected by the test)."""
    r = subprocess.run([sys.executable, "-c", KILLER, "shards", str(n), str(src), str(dst), "--workers", "2", *args],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)


@pytest.mark.full
def test_resume_after_sigkill_same_bytes_and_counts(src, out_bf16, tmp_path):
    """Killed after the shard holding every dequantized tensor is journaled: the same command re-uses it
    (its counts come from the journal) and writes the rest; every file, the card's counts included, is
    byte-identical to the uninterrupted conversion."""
    ref, _ = out_bf16
    dst = tmp_path / "bf16"  # the card names DST's folder: the same name as the reference
    _killed_after_shards(src, dst, 2, "--dequantize")
    staging = staging_path(dst)
    journal = json.loads((staging / JOURNAL).read_text())
    deq = journal["shards"]["model-00002-of-00003.safetensors"]["dequant"]
    assert deq == torch_counts(src, ref)  # every widened tensor sits in shard 2
    r = cli(src, dst, "--dequantize")
    assert r.returncode == 0, r.stderr
    assert "re-using 2 completed shard(s)" in r.stderr
    assert _files(dst) == _files(ref)


@pytest.mark.full
@pytest.mark.parametrize("again,why", [((), "option dequantize changed ('consumers' -> None)"),
                                       (("--dequantize", "--merged-dtype", "float32"),
                                        "option merged_dtype changed ('source' -> 'float32')")])
def test_resume_fingerprint_has_dequantize_and_merged_dtype(src, tmp_path, again, why):
    dst = tmp_path / "out"
    _killed_after_shards(src, dst, 2, "--dequantize")
    r = cli(src, dst, *again)
    assert r.returncode == 0, r.stderr
    assert why in r.stderr, r.stderr


# --- the Hub: remote plan, --stream, over real HTTP (tests/hubserver.py, huggingface_hub's own client) ---------
from tests.hubserver import hub_server  # noqa: E402,F401  (a fixture)

SCALES = "model-00003-of-00003.safetensors"  # the scales of every widened weight (in shard 2) sit here


def test_stream_dequantize_fetches_scale_ranges(src, out_bf16, tmp_path, hub_server):  # noqa: F811
    """``--stream --dequantize --verify`` from a repo id: the shards, index and config pushed in one commit are
    the local conversion's, byte for byte; the card states the same counts; the task of shard 2 reads its
    weights' scales from shard 3 by Range requests, before shard 3 is downloaded (once) for its own task."""
    import streamfold
    ref, _ = out_bf16
    hub_server.add_repo("org/fp8", src)
    before = len(hub_server.requests)
    report = streamfold.convert("org/fp8", tmp_path / "small", push_to_hub="me/fp8-deq", stream=True, verify=True,
                                dequantize=True)
    assert report.dequant_counts == torch_counts(src, ref)
    got = hub_server.files("me/fp8-deq")
    for name in [p.name for p in ref.iterdir() if p.name != "README.md"]:
        assert got[name] == (ref / name).read_bytes(), name
    assert card_counts(got["README.md"]) == card_counts((ref / "README.md").read_bytes())
    gets = [r for r in hub_server.requests[before:] if r.method == "GET" and r.path.endswith(SCALES)]
    full = [i for i, r in enumerate(gets) if "range" not in r.headers]
    starts = [r.headers.get("range", "bytes=0-").split("=")[1].split("-")[0] for r in gets]
    scale_reads = [i for i, a in enumerate(starts) if a != "0"]
    assert len(full) == 1 and scale_reads and max(scale_reads) < full[0], [r.headers.get("range") for r in gets]


# --- Ray: one task per shard, locally (shared storage) and from the Hub; --stream --ray ---------------------
from tests.test_ray import cluster, faults  # noqa: E402,F401  (fixtures: one local Ray cluster + a Hub it sees)


@pytest.mark.full
def test_ray_dequantize_same_bytes_and_counts(cluster, faults, src, out_bf16, tmp_path):  # noqa: F811
    """``--ray --dequantize`` from the folder (shared storage) and from a repo id (each task fetches its own
    shard and its scale rows by Range): every file the local conversion's, the counts carried back from the
    tasks (through on_done and the journal) into the card and the report."""
    import streamfold
    ref, _ = out_bf16
    want = torch_counts(src, ref)
    rep = streamfold.convert(src, tmp_path / "a" / "bf16", executor="ray", dequantize=True, workers=1,
                             memory_budget=1 << 20)
    assert rep.dequant_counts == want
    assert _files(tmp_path / "a" / "bf16") == _files(ref)
    hub = cluster["hub"]
    hub.add_repo("org/fp8-ray", src)
    rep = streamfold.convert("org/fp8-ray", tmp_path / "b" / "bf16", executor="ray", dequantize=True, verify=True,
                             workers=1, memory_budget=1 << 20)
    assert rep.dequant_counts == want
    got, exp = _files(tmp_path / "b" / "bf16"), _files(ref)
    assert {k: v for k, v in got.items() if k != "README.md"} == {k: v for k, v in exp.items() if k != "README.md"}
    assert card_counts(got["README.md"]) == card_counts(exp["README.md"])


@pytest.mark.full
def test_stream_ray_dequantize(cluster, faults, src, out_bf16, tmp_path):  # noqa: F811
    """``--stream --ray --dequantize --verify``: each task fetches, converts, checks and pre-uploads its shard;
    the one commit holds the local conversion's shards, index and config, and the card's counts."""
    import streamfold
    ref, _ = out_bf16
    hub = cluster["hub"]
    hub.add_repo("org/fp8-stream-ray", src)
    rep = streamfold.convert("org/fp8-stream-ray", tmp_path / "small", push_to_hub="me/fp8-stream-ray", stream=True,
                             executor="ray", verify=True, dequantize=True, workers=1, memory_budget=1 << 20)
    assert rep.dequant_counts == torch_counts(src, ref)
    got = hub.files("me/fp8-stream-ray")
    for name in [p.name for p in ref.iterdir() if p.name != "README.md"]:
        assert got[name] == (ref / name).read_bytes(), name
    assert card_counts(got["README.md"]) == card_counts((ref / "README.md").read_bytes())


# --- verify --forward: the numpy forward reads FP8 block weights (q·s) -----------------------------------------
@pytest.mark.full
def test_verify_forward_fp8_block(src, out_bf16, tmp_path):
    """The numpy forward of the FP8 source equals transformers' float32 dequantized logits (so it reads the FP8
    layout right); ``verify --forward`` of the bf16 ``--dequantize`` output passes with argmax agreement, and
    fails on an output whose folded norm was put back (the norm then applies twice)."""
    from streamfold.check.forward import logits as np_logits
    from tests.test_quant_partial import IDS, load, logits
    want = logits(load(src))[0].numpy()
    got = np_logits(src, IDS[0].numpy())
    assert float(abs(got - want).max() / abs(want).max()) <= 1e-5
    dst, _ = out_bf16
    v = cli("verify", src, dst, "--forward", "--json")
    assert v.returncode == 0, v.stdout
    f = json.loads(v.stdout)["forward"]
    assert f["min_cosine"] >= 0.9999 and f["argmax_agreement"] == 1.0, f
    bad = tmp_path / "bad"
    shutil.copytree(dst, bad)
    norm = "model.layers.0.input_layernorm.weight"
    index = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    from streamfold.core.reader import SafetensorsFile
    t = SafetensorsFile(bad / index[norm]).tensors[norm]
    s = SafetensorsFile(src / index[norm]).tensors[norm]
    with open(s.path, "rb") as f_src, open(t.path, "r+b") as f_dst:
        f_src.seek(s.begin)
        f_dst.seek(t.begin)
        f_dst.write(f_src.read(s.nbytes))
    v = cli("verify", src, bad, "--forward", "--json")
    assert v.returncode == 3
    assert any(p["check"] == "forward" for p in json.loads(v.stdout)["problems"]), v.stdout


def test_plan_run_task_finish_carries_the_counts(src, out_bf16, tmp_path):
    """The library's three steps: ``finish(results=...)`` states the tasks' counts (the same bytes as the CLI's
    conversion); without them, a dequantizing plan's finish refuses in one line instead of a card without them."""
    import streamfold
    from streamfold.core.errors import StreamfoldError
    ref, _ = out_bf16
    p = streamfold.plan(src, dequantize=True, memory_budget=1 << 18)
    out = tmp_path / "bf16"
    out.mkdir()
    results = [streamfold.run_task(t, out, src=p.src) for t in p.tasks]
    with pytest.raises(StreamfoldError, match="pass results="):
        streamfold.finish(p, out)
    streamfold.finish(p, out, results=results)
    assert _files(out) == _files(ref)


@pytest.mark.full
def test_resume_redoes_a_dequantizing_shard_journaled_without_counts(src, out_bf16, tmp_path):
    """A journal written before the counts existed: the shard that dequantized is written again (its counts
    are unknown), the other re-used; the output is still the uninterrupted conversion's."""
    ref, _ = out_bf16
    dst = tmp_path / "bf16"
    _killed_after_shards(src, dst, 2, "--dequantize")
    path = staging_path(dst) / JOURNAL
    journal = json.loads(path.read_text())
    for rec in journal["shards"].values():
        del rec["dequant"]
    path.write_text(json.dumps(journal))
    r = cli(src, dst, "--dequantize")
    assert r.returncode == 0, r.stderr
    assert "re-using 1 completed shard(s); redoing 1 that did not check out (model-00002-of-00003" in r.stderr
    assert _files(dst) == _files(ref)


@pytest.mark.full
def test_forward_still_skips_other_quantized_formats(tmp_path):
    """compressed-tensors FP8 (channel scales): not read by the numpy forward; verify notes it and moves on."""
    from streamfold.check.forward import Decoder, ForwardUnsupported
    path = tmp_path / "ct"
    path.mkdir()
    qm.ct_fp8_channel("qwen3", path, **QWEN3)
    with pytest.raises(ForwardUnsupported, match="unquantized and FP8 block-quantized"):
        Decoder(path)


@pytest.mark.full
def test_stream_dequantize_mxfp4(tmp_path, hub_server):  # noqa: F811
    """gpt-oss MXFP4 through ``--stream --dequantize --verify``: the local conversion's shards, index and config,
    and the same counts (every unfolded down_proj element exact: E2M1 x 2^k fits bf16)."""
    import streamfold
    from tests.test_quant_partial import GPT_OSS
    src = tmp_path / "gptoss"
    src.mkdir()
    qm.gpt_oss_mxfp4(src, **GPT_OSS)
    ref = streamfold.convert(src, tmp_path / "ref" / "small", dequantize=True)
    hub_server.add_repo("org/gpt-oss", src)
    rep = streamfold.convert("org/gpt-oss", tmp_path / "small", push_to_hub="me/gpt-oss-deq", stream=True,
                             verify=True, dequantize=True, memory_budget=1 << 20)
    assert rep.dequant_counts == ref.dequant_counts
    down = [v for k, v in rep.dequant_counts.items() if k.endswith("down_proj")]
    assert down and all(r == 0 for _, r in down)
    got = hub_server.files("me/gpt-oss-deq")
    for p in (tmp_path / "ref" / "small").iterdir():
        if p.name != "README.md":
            assert got[p.name] == p.read_bytes(), p.name
    assert card_counts(got["README.md"]) == card_counts((tmp_path / "ref" / "small" / "README.md").read_bytes())
