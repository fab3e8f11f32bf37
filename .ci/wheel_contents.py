"""Check what a built fcnfast wheel or sdist contains (used by .ci/wheel_check).

    python .ci/wheel_contents.py wheel dist/fcnfast-*.whl --source-root "$PWD"
    python .ci/wheel_contents.py sdist dist/fcnfast-*.tar.gz --source-root "$PWD"

Wheel: only fcnfast/ and its .dist-info; the compiled fcnfast/_C*.so; no tests, no build
products (.o, .pyc), no C++ host sources (the CUDA kernel sources and common headers under
fcnfast/_csrc/ ship on purpose: the CuPy backend compiles them at run time); no absolute or
source-tree paths in file names or RECORD. The .so is searched for the source-tree path too
(from debug info / __FILE__): reported, and an error with --strict-so-paths.
Sdist: every file git tracks under csrc/ and fcnfast/, plus setup.py, pyproject.toml,
MANIFEST.in, README.md, and nothing built (.so, .o).
Prints a summary; exits non-zero listing every problem.
"""

import argparse
import os
import subprocess
import sys
import tarfile
import zipfile

FORBIDDEN_SUFFIXES = (".o", ".pyc", ".pyo", ".a", ".obj", ".ninja_deps", ".ninja_log")


def check_wheel(path, source_root, strict_so_paths):
    problems, notes = [], []
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        dist_info = [n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")]
        top = {n.split("/")[0] for n in names}
        allowed_top = {"fcnfast"} | set(dist_info)
        for name in names:
            if name.startswith("/") or ".." in name.split("/") or "\\" in name:
                problems.append("unsafe path in wheel: %s" % name)
            if source_root and source_root.strip("/") in name:
                problems.append("source-tree path in a file name: %s" % name)
            if name.endswith(FORBIDDEN_SUFFIXES) or "__pycache__" in name:
                problems.append("build product in wheel: %s" % name)
            parts = name.split("/")
            if "tests" in parts or parts[-1].startswith("test_") or parts[-1] == "conftest.py":
                problems.append("test file in wheel: %s" % name)
            if name.endswith((".cpp", ".cc", ".cxx")):
                problems.append("C++ host source in wheel: %s" % name)
            if name.endswith((".h", ".cuh", ".cu")) and not name.startswith("fcnfast/_csrc/"):
                problems.append("source file outside fcnfast/_csrc: %s" % name)
        for extra in sorted(top - allowed_top):
            problems.append("unexpected top-level entry: %s" % extra)
        sos = [n for n in names if n.startswith("fcnfast/_C") and n.endswith(".so")]
        if len(sos) != 1:
            problems.append("expected exactly one fcnfast/_C*.so, found %s" % sos)
        for required in (
            "fcnfast/__init__.py",
            "fcnfast/ops.py",
            "fcnfast/reference.py",
            # the shipped CamVid model and its model card (package data)
            "fcnfast/weights/fcn8s_lite0_camvid.pt",
            "fcnfast/weights/fcn8s_lite0_camvid.md",
        ):
            if required not in names:
                problems.append("missing %s" % required)
        record = [n for n in names if n.endswith(".dist-info/RECORD")]
        if record:
            text = zf.read(record[0]).decode()
            for line in text.splitlines():
                entry = line.split(",")[0]
                if entry.startswith("/") or (source_root and source_root in line):
                    problems.append("absolute/source path in RECORD: %s" % line)
        else:
            problems.append("no RECORD")
        entry_points = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        if (
            not entry_points
            or "fcnfast = fcnfast.cli:main" not in zf.read(entry_points[0]).decode()
        ):
            problems.append("console script `fcnfast` missing from entry_points.txt")
        for so in sos:
            data = zf.read(so)
            hits = data.count(source_root.encode()) if source_root else 0
            line = "%s: %.1f MB, source-tree path %r appears %d times" % (
                so,
                len(data) / 2**20,
                source_root,
                hits,
            )
            if hits:
                line += (
                    " (debug info / __FILE__; build with -ffile-prefix-map=%s/= "
                    "or -g0 to drop it)" % source_root
                )
                if strict_so_paths:
                    problems.append(line)
            notes.append(line)
        size = sum(i.file_size for i in infos)
        by_dir = {}
        for i in infos:
            key = (
                "/".join(i.filename.split("/")[:2])
                if i.filename.count("/") > 1
                else i.filename.split("/")[0]
            )
            by_dir[key] = by_dir.get(key, 0) + 1
    print(
        "wheel %s: %d files, %.1f MB unpacked" % (os.path.basename(path), len(names), size / 2**20)
    )
    for key in sorted(by_dir):
        print("  %-40s %d files" % (key, by_dir[key]))
    for note in notes:
        print("  " + note)
    return problems


def tracked_files(source_root, *dirs):
    try:
        out = subprocess.run(
            ["git", "-C", source_root, "ls-files", *dirs],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return [line for line in out.splitlines() if line]


def check_sdist(path, source_root):
    problems = []
    with tarfile.open(path) as tf:
        members = [m.name for m in tf.getmembers() if m.isfile()]
    prefix = members[0].split("/")[0]
    rel = {m[len(prefix) + 1 :] for m in members}
    for required in (
        "setup.py",
        "pyproject.toml",
        "MANIFEST.in",
        "README.md",
        "fcnfast/__init__.py",
        "csrc/bindings.cpp",
    ):
        if required not in rel:
            problems.append("sdist lacks %s" % required)
    tracked = tracked_files(source_root, "csrc", "fcnfast") if source_root else None
    if tracked is None:
        print("  (git not available: tracked-file comparison skipped)")
    else:
        for name in tracked:
            if name not in rel:
                problems.append("sdist lacks tracked file %s (MANIFEST.in?)" % name)
    for name in sorted(rel):
        if name.endswith((".so",) + FORBIDDEN_SUFFIXES) or "__pycache__" in name:
            problems.append("build product in sdist: %s" % name)
        if name.startswith(("build/", "dist/", ".venv/")):
            problems.append("build directory in sdist: %s" % name)
    headers = sorted(n for n in rel if n.startswith("csrc/") and n.endswith((".h", ".cuh")))
    print("sdist %s: %d files, %d csrc headers" % (os.path.basename(path), len(rel), len(headers)))
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("wheel", "sdist"))
    parser.add_argument("path")
    parser.add_argument("--source-root", default="")
    parser.add_argument(
        "--strict-so-paths",
        action="store_true",
        help="fail when the .so contains the source-tree path",
    )
    args = parser.parse_args(argv)
    root = os.path.realpath(args.source_root) if args.source_root else ""
    if args.kind == "wheel":
        problems = check_wheel(args.path, root, args.strict_so_paths)
    else:
        problems = check_sdist(args.path, root)
    for p in problems:
        print("PROBLEM: " + p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
