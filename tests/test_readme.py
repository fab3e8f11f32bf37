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
