import os
import subprocess
import sys

import fcnfast


def test_backend_native_after_install():
    expected = "reference" if os.environ.get("FCNFAST_BACKEND") == "reference" else "native"
    assert fcnfast.backend() == expected, fcnfast.build_info()


def test_build_info_fields():
    info = fcnfast.build_info()
    for key in ("version", "backend", "torch", "threads", "compiled_cpu", "compiled_cuda"):
        assert key in info
    assert info["version"] == fcnfast.__version__


def test_env_forces_reference():
    code = "import fcnfast; print(fcnfast.backend())"
    env = dict(os.environ, FCNFAST_BACKEND="reference")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "reference"


def test_bad_env_value_is_clear():
    env = dict(os.environ, FCNFAST_BACKEND="fast")
    out = subprocess.run(
        [sys.executable, "-c", "import fcnfast; fcnfast.backend()"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and "FCNFAST_BACKEND must be one of" in out.stderr


def test_broken_extension_falls_back_with_one_warning(tmp_path):
    """A package whose _C cannot load imports fine, warns once, and runs the reference."""
    pkg = tmp_path / "fcnfast"
    src = os.path.dirname(fcnfast.__file__)
    pkg.mkdir()
    for name in os.listdir(src):
        if name.endswith(".py"):
            (pkg / name).write_text(open(os.path.join(src, name)).read())
        elif os.path.isdir(os.path.join(src, name)) and not name.startswith("__"):
            import shutil

            shutil.copytree(
                os.path.join(src, name),
                pkg / name,
                ignore=shutil.ignore_patterns("*.so", "__pycache__"),
            )
    (pkg / "_C.py").write_text("raise ImportError('simulated broken build')\n")
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import fcnfast\n"
        "    y = fcnfast.skip_add_crop(torch.ones(1,1,2,2), torch.ones(1,1,3,3), (1,1))\n"
        "    fcnfast.skip_add_crop(torch.ones(1,1,2,2), torch.ones(1,1,3,3), (1,1))\n"
        "print(fcnfast.backend(), float(y.sum()), sum('native extension not available' in str(x.message) for x in w))\n"
    )
    env = dict(os.environ)
    env.pop("FCNFAST_BACKEND", None)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["reference", "8.0", "1"], out.stdout


def test_use_backend_context():
    with fcnfast.use_backend("reference"):
        assert fcnfast.backend() == "reference"
    assert fcnfast.backend() in ("native", "reference")
