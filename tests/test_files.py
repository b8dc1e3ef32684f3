"""One file policy (streamfold/files.py): convert, the Hub download, verify and the manifest agree."""
import shutil
from pathlib import Path

import streamfold
from streamfold.core import files
from streamfold.hub import client as hub
from streamfold.core.manifest import list_files

SAMPLE = Path(__file__).resolve().parents[1] / "streamfold" / "sample"
SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
# Other weight formats / exports: convert used to copy the first four (a shorter list than the Hub's).
OTHER_WEIGHTS = ["model.npz", "model.nemo", "onnx/model.onnx_data", "original/params.json", "pytorch_model.bin",
                 "consolidated.00.pth", "original/tokenizer.model", "stale-shard.safetensors"]
HIDDEN = [".gitattributes", ".git/config", ".cache/huggingface/x.lock", "sub/.DS_Store"]
COPIED = ["generation_config.json", "tokenizer.json", "LICENSE", "sub/chat_template.jinja"]


def make_src(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(SAMPLE, src)
    for rel in OTHER_WEIGHTS + HIDDEN + COPIED[1:] + ["README.md"]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(f"contents of {rel}\n")
    return src


def test_local_and_hub_selection_agree(tmp_path):
    src = make_src(tmp_path)
    keep, skipped = files.other_files(src, set(SHARDS))
    assert sorted(k.as_posix() for k in keep) == sorted(COPIED)
    assert sorted(skipped) == sorted(OTHER_WEIGHTS)
    listing = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    take, not_taken = hub.select_files(listing, SHARDS)
    assert sorted(not_taken) == sorted(OTHER_WEIGHTS)  # hidden files are in neither list
    rewritten = {*SHARDS, "model.safetensors.index.json", "config.json", "README.md"}
    assert sorted(set(take) - rewritten) == sorted(COPIED)


def test_convert_copies_by_the_policy_and_verify_checks_it(tmp_path):
    src = make_src(tmp_path)
    dst = tmp_path / "out"
    report = streamfold.convert(src, dst, manifest=True)
    out = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file())
    assert out == sorted([*SHARDS, "model.safetensors.index.json", "config.json", "README.md", "SHA256SUMS",
                          *COPIED])
    assert sorted(report.copied_files) == sorted(COPIED)
    assert sorted(report.skipped_files) == sorted(OTHER_WEIGHTS)
    assert ".gitattributes" not in report.summary() and "model.npz" in report.summary()
    assert (dst / "README.md").read_text() != (src / "README.md").read_text()  # streamfold's own card
    assert streamfold.verify(src, dst).ok
    (dst / "model.nemo").write_text("unfolded weights")
    (dst / ".gitattributes").write_text("*.safetensors filter=lfs\n")  # hidden: ignored, as everywhere
    problems = [str(p) for p in streamfold.verify(src, dst).problems]
    assert any("model.nemo" in p and "another weight format" in p for p in problems), problems
    assert not any(".gitattributes" in p for p in problems), problems
    assert ".gitattributes" not in list_files(dst) and "model.nemo" in list_files(dst)
