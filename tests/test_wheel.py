"""Packaging: the sdist carries every source, the wheel checker catches bad wheels, and (with
FCNFAST_WHEEL_TEST=1) the full .ci/wheel_check: build the wheel, inspect it, install it into a
fresh venv and run every op from outside the source tree, and the same from the sdist.
"""

import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CI = os.path.join(ROOT, ".ci")
CONTENTS = os.path.join(CI, "wheel_contents.py")

needs_source_tree = pytest.mark.skipif(
    not (os.path.exists(os.path.join(ROOT, "setup.py")) and os.path.exists(CONTENTS)),
    reason="needs the source tree (setup.py, .ci/wheel_contents.py)",
)


def run_contents(*args):
    return subprocess.run([sys.executable, CONTENTS, *args], capture_output=True, text=True)


def make_wheel(path, files):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return str(path)


GOOD = {
    "fcnfast/__init__.py": "",
    "fcnfast/ops.py": "",
    "fcnfast/reference.py": "",
    "fcnfast/_C.cpython-311-x86_64-linux-gnu.so": b"\x7fELF",
    "fcnfast/_csrc/cuda/op.cu": "",
    "fcnfast/_csrc/common/geometry.h": "",
    "fcnfast/weights/fcn8s_lite0_camvid.pt": b"weights",
    "fcnfast/weights/fcn8s_lite0_camvid.md": "model card",
    "fcnfast-0.1.0.dist-info/entry_points.txt": "[console_scripts]\nfcnfast = fcnfast.cli:main\n",
    "fcnfast-0.1.0.dist-info/RECORD": "fcnfast/__init__.py,sha256=x,0\n",
}


@needs_source_tree
def test_wheel_checker_accepts_a_clean_wheel(tmp_path):
    out = run_contents(
        "wheel", make_wheel(tmp_path / "good.whl", GOOD), "--source-root", "/no/such/dir"
    )
    assert out.returncode == 0, out.stdout + out.stderr


@needs_source_tree
@pytest.mark.parametrize(
    "extra,problem",
    [
        ({"tests/test_ops.py": ""}, "test file in wheel"),
        ({"fcnfast/tests/conftest.py": ""}, "test file in wheel"),
        ({"fcnfast/ops.o": ""}, "build product"),
        ({"fcnfast/__pycache__/ops.cpython-311.pyc": ""}, "build product"),
        ({"csrc/cpu/op.cpp": ""}, "C++ host source"),
        ({"csrc/common/geometry.h": ""}, "outside fcnfast/_csrc"),
        ({"build/lib/x.py": ""}, "unexpected top-level entry"),
        ({"fcnfast-0.1.0.dist-info/RECORD": "/work/src/fcnfast/ops.py,sha256=x,0\n"}, "RECORD"),
        ({"fcnfast-0.1.0.dist-info/entry_points.txt": ""}, "console script"),
        (
            {"fcnfast/_C.cpython-311-x86_64-linux-gnu.so": b"/no/such/dir/csrc/cpu/op.cpp"},
            "source-tree path",
        ),
    ],
)
def test_wheel_checker_rejects(tmp_path, extra, problem):
    files = dict(GOOD, **extra)
    out = run_contents(
        "wheel",
        make_wheel(tmp_path / "bad.whl", files),
        "--source-root",
        "/no/such/dir",
        "--strict-so-paths",
    )
    assert out.returncode == 1 and problem in out.stdout, out.stdout + out.stderr


@needs_source_tree
def test_sdist_has_every_source(tmp_path):
    """MANIFEST.in: every tracked csrc/ header and source (and fcnfast/ file) is in the sdist."""
    if subprocess.run(["git", "-C", ROOT, "rev-parse"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: cannot list the tracked sources")
    # a fresh egg-info outside the tree: a stale SOURCES.txt would hide a MANIFEST.in gap
    egg = tmp_path / "egg"
    egg.mkdir()
    built = subprocess.run(
        [
            sys.executable,
            "setup.py",
            "-q",
            "egg_info",
            "--egg-base",
            str(egg),
            "sdist",
            "-d",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, FCNFAST_CUDA="0"),
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (sdist,) = [p for p in os.listdir(tmp_path) if p.endswith(".tar.gz")]
    out = run_contents("sdist", str(tmp_path / sdist), "--source-root", ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_source_tree
@pytest.mark.skipif(
    os.environ.get("FCNFAST_WHEEL_TEST") != "1",
    reason="set FCNFAST_WHEEL_TEST=1 to build and install the wheel (minutes)",
)
def test_wheel_check_script():
    env = dict(os.environ, PYTHON=sys.executable)
    out = subprocess.run(
        ["bash", os.path.join(CI, "wheel_check")],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    assert "wheel_check: passed" in out.stdout
