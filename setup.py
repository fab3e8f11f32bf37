"""Build fcnfast and its native extension ``fcnfast._C``.

Environment switches (printed at build time):

  FCNFAST_CUDA=auto|0|1       build the CUDA kernels: auto = when nvcc and a CUDA build of torch exist
  TORCH_CUDA_ARCH_LIST        CUDA architectures (default "8.0;9.0"; add "+PTX" for newer GPUs)
  FCNFAST_CUDA_BACKEND        run time, not build time: auto|native|cupy (see fcnfast/_backend.py)
  FCNFAST_NATIVE_ARCH=1       add -march=native (not portable; the default baseline is AVX2+FMA)
  FCNFAST_SANITIZE=address,undefined   compile the CPU kernels with ASan/UBSan (see README)
  DEBUG=1                     -O0 -g
  MAX_JOBS                    parallel compile jobs (ninja)

Build against the installed torch with ``pip install --no-build-isolation .``: an isolated build
could compile against a different torch than the one that loads the extension.
"""

import glob
import os
import platform
import re
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(HERE, "fcnfast", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def env_flag(name, default="auto"):
    return os.environ.get(name, default).strip().lower()


def rel(paths):
    # setuptools wants source paths relative to setup.py
    return sorted(os.path.relpath(p, HERE) for p in paths)


def want_cuda(torch, cuda_home):
    setting = env_flag("FCNFAST_CUDA")
    if setting in ("0", "false", "no", "off"):
        return False
    available = cuda_home is not None and torch.version.cuda is not None
    if setting in ("1", "true", "yes", "on"):
        if not available:
            raise RuntimeError(
                "FCNFAST_CUDA=1 but no CUDA toolchain (CUDA_HOME=%r) or the installed torch is a "
                "CPU build (torch.version.cuda=%r)" % (cuda_home, torch.version.cuda)
            )
        return True
    return available


def cpu_flags():
    flags = ["-std=c++20", "-fopenmp"]
    if os.environ.get("DEBUG") == "1":
        flags += ["-O0", "-g"]
    else:
        # -g0 and the prefix map keep build-directory paths out of the shipped binary
        flags += ["-O3", "-g0", "-ffile-prefix-map=%s/=" % HERE]
    machine = platform.machine().lower()
    if env_flag("FCNFAST_NATIVE_ARCH", "0") == "1":
        flags.append("-march=native")
    elif machine in ("x86_64", "amd64"):
        # portable baseline: any x86-64 with AVX2 + FMA (Haswell and later)
        flags += ["-mavx2", "-mfma", "-mf16c"]
    return flags


SANITIZERS = ("address", "undefined", "leak")


def sanitize_flags():
    """Compile and link flags for FCNFAST_SANITIZE (comma list of address, undefined, leak).

    The extension is loaded into an uninstrumented Python, so the sanitizer runtimes must be
    preloaded at run time; .ci/sanitize shows how (LD_PRELOAD, ASAN_OPTIONS, UBSAN_OPTIONS).
    """
    sanitize = os.environ.get("FCNFAST_SANITIZE", "").strip().replace(" ", "")
    if not sanitize:
        return [], [], ""
    unknown = sorted(set(sanitize.split(",")) - set(SANITIZERS))
    if unknown:
        raise RuntimeError(
            "FCNFAST_SANITIZE=%s: unknown sanitizer(s) %s (choose from %s)"
            % (sanitize, ", ".join(unknown), ", ".join(SANITIZERS))
        )
    # -O1: the optimisation level ASan documents for readable reports (the later -O wins).
    # -fno-wrapv: Python's own CFLAGS carry -fwrapv, which defines signed overflow and so
    # silently disables UBSan's signed-integer-overflow check -- exactly the 32-bit index
    # overflow these builds look for.
    flags = ["-fsanitize=" + sanitize, "-fno-omit-frame-pointer", "-g", "-O1", "-fno-wrapv"]
    if "undefined" in sanitize:
        # every UBSan finding aborts (non-zero exit) instead of printing and going on
        flags.append("-fno-sanitize-recover=undefined")
    return flags, ["-fsanitize=" + sanitize], sanitize


def make_extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    version = read_version()
    with_cuda = want_cuda(torch, CUDA_HOME)
    san_cflags, san_ldflags, sanitize = sanitize_flags()
    define = [
        ("FCNFAST_VERSION", '"%s"' % version),
        ("FCNFAST_TORCH_VERSION", '"%s"' % torch.__version__),
    ]
    if sanitize:
        define.append(("FCNFAST_SANITIZE", '"%s"' % sanitize))
    sources = rel(
        [os.path.join(HERE, "csrc", "bindings.cpp")]
        + glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp"))
    )
    cxx = cpu_flags() + san_cflags
    extra_compile_args = {"cxx": cxx}
    extra_link_args = ["-fopenmp"] + san_ldflags
    ext_cls = CppExtension
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += rel(
            glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu"))
            + glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cpp"))
        )
        define.append(("FCNFAST_WITH_CUDA", None))
        # The .cu files are torch-free C++17 (the same standard NVRTC compiles them with for
        # the CuPy backend, and what .ci/cuda_compile_check uses); bindings_cuda.cpp is host
        # C++ and gets the cxx flags. -lineinfo keeps kernels profilable at no speed cost.
        nvcc = ["-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
        nvcc += ["-O0", "-g"] if os.environ.get("DEBUG") == "1" else ["-O3"]
        extra_compile_args["nvcc"] = nvcc
        ext_cls = CUDAExtension
    print(
        "fcnfast build: version=%s torch=%s cuda=%s arch_list=%s cxx=%s sanitize=%s max_jobs=%s"
        % (
            version,
            torch.__version__,
            with_cuda,
            os.environ.get("TORCH_CUDA_ARCH_LIST", "-") if with_cuda else "-",
            " ".join(cxx),
            sanitize or "-",
            os.environ.get("MAX_JOBS", "auto"),
        )
    )
    return [
        ext_cls(
            name="fcnfast._C",
            sources=sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=define,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    ]


# The CuPy backend (fcnfast/_cupy.py) compiles csrc/cuda/*.cu at run time, so wheels ship those
# sources and the headers they include under fcnfast/_csrc/{common,cuda}.
CUDA_SOURCE_GLOBS = ("common/*.h", "cuda/*.cu", "cuda/*.cuh", "cuda/*.h")


class BuildPyWithCudaSources(build_py):
    def run(self):
        super().run()
        if self.dry_run:
            return
        for pattern in CUDA_SOURCE_GLOBS:
            for src in glob.glob(os.path.join(HERE, "csrc", pattern)):
                dst = os.path.join(
                    self.build_lib,
                    "fcnfast",
                    "_csrc",
                    os.path.relpath(src, os.path.join(HERE, "csrc")),
                )
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copyfile(src, dst)


def build_ext_cls():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    version=read_version(),
    packages=find_packages(include=["fcnfast", "fcnfast.*"]),
    # the shipped trained models (fcnfast.models.pretrained) and their model cards
    package_data={"fcnfast": ["weights/*.pt", "weights/*.md"]},
    ext_modules=make_extensions(),
    cmdclass={"build_ext": build_ext_cls(), "build_py": BuildPyWithCudaSources},
    zip_safe=False,
)
