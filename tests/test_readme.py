"""Issue 16, item 6: the README's Python code blocks run as written."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_blocks():
    assert BLOCKS, "no ```python block found in README.md"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(BLOCKS[index], "README.md python block %d" % (index + 1), "exec"), {})
    finally:
        torch.set_num_threads(threads)


ROOT = README.parent
# where FCNFAST_* switches are read or defined: the package, the native sources, the build, the
# benchmarks, CI and the tests
SOURCES = ["fcnfast", "csrc", "setup.py", "benchmarks", ".ci", "tests"]
SUFFIXES = {".py", ".cpp", ".h", ".cu", ".cuh", ".sh", ""}


def _section(title):
    text = README.read_text()
    start = text.index("\n## %s\n" % title)
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def _source_names():
    names = set()
    for entry in SOURCES:
        path = ROOT / entry
        files = [path] if path.is_file() else path.rglob("*") if path.is_dir() else []
        for f in files:
            if not f.is_file() or f.suffix not in SUFFIXES or "__pycache__" in f.parts:
                continue
            names.update(
                re.findall(r"\bFCNFAST_[A-Z0-9_]*[A-Z0-9]\b", f.read_text(errors="replace"))
            )
    return names


def test_every_fcnfast_switch_is_in_the_readme_table():
    if not (ROOT / "csrc").is_dir():
        pytest.skip("no source tree next to the README")
    listed = set(re.findall(r"`(FCNFAST_[A-Z0-9_]+)`", _section("Environment variables")))
    found = _source_names()
    assert {"FCNFAST_BACKEND", "FCNFAST_DIST_TIMEOUT", "FCNFAST_CUDA"} <= found
    assert sorted(found - listed) == [], "FCNFAST_* names missing from the README's table"
    assert sorted(listed - found) == [], "README lists FCNFAST_* names no source uses"
