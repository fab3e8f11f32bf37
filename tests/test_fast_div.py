"""csrc/common/fast_div.h: the CUDA kernels' multiply-shift division by a fixed divisor.

A small C++ program includes the header and compares ``FastDiv::div`` (and the signed
``floor_div_by`` / ``ceil_div_by``) with plain integer division over every divisor up to 2^16,
powers of two and their neighbours, random divisors up to 2^31 - 1, and numerators at 0, at the
multiples of the divisor and one either side, at 2^31 - 1 and at random. The same program run
with a multiplier one too small must report mismatches, so the comparison can fail.
"""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = r"""
#include <cstdio>
#include <cstdlib>
#include <random>
#include "common/fast_div.h"
using namespace fcnfast;

static long long mismatches = 0, checks = 0;

static long long floor_ref(long long n, long long d) { long long q = n / d; return (n % d != 0 && n < 0) ? q - 1 : q; }
static long long ceil_ref(long long n, long long d) { return -floor_ref(-n, d); }

static void check(const FastDiv& f, int n) {
  ++checks;
  if (f.div(n) != n / f.d) ++mismatches;
}
static void check_signed(const FastDiv& f, int n) {  // |n| + d < 2^31
  checks += 2;
  if (floor_div_by(n, f) != floor_ref(n, f.d)) ++mismatches;
  if (ceil_div_by(n, f) != ceil_ref(n, f.d)) ++mismatches;
}

static void divisor(int d, std::mt19937& rng, int skew) {
  FastDiv f = MakeFastDiv()(d);
  f.m += skew;  // skew != 0: a planted error the comparison must catch
  const int max = 2147483647;
  for (int n = 0; n < 64; ++n) check(f, n);
  for (long long k = 1; k <= 64 && k * d <= max; ++k) {
    const long long n = k * d;
    check(f, (int)n - 1);
    check(f, (int)n);
    if (n < max) check(f, (int)n + 1);
  }
  const long long last = (long long)(max / d) * d;  // the largest multiple that fits
  for (long long n = last - 2; n <= last + 2 && n <= max; ++n) if (n >= 0) check(f, (int)n);
  for (int k = 3; k >= 0; --k) check(f, max - k);
  std::uniform_int_distribution<int> any(0, max);
  for (int i = 0; i < 64; ++i) check(f, any(rng));
  if (d < (1 << 30)) {
    std::uniform_int_distribution<int> half(-(max / 2) + d, max / 2 - d);
    for (int i = 0; i < 32; ++i) check_signed(f, half(rng));
    for (int n = -3 * d; n <= 3 * d && n <= 100000; n += (d > 1000 ? d / 7 + 1 : 1)) check_signed(f, n);
  }
}

int main(int argc, char** argv) {
  const int skew = argc > 1 ? atoi(argv[1]) : 0;
  std::mt19937 rng(20261202);
  for (int d = 1; d <= 65536; ++d) divisor(d, rng, skew);
  for (int s = 16; s <= 30; ++s) {
    divisor((1 << s) - 1, rng, skew);
    divisor(1 << s, rng, skew);
    divisor((1 << s) + 1, rng, skew);
  }
  divisor(2147483647, rng, skew);
  std::uniform_int_distribution<int> big(65537, 2147483647);
  for (int i = 0; i < 20000; ++i) divisor(big(rng), rng, skew);
  printf("%lld %lld\n", checks, mismatches);
  return 0;
}
"""


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        pytest.skip("needs a C++ compiler (g++)")
    tmp = tmp_path_factory.mktemp("fast_div")
    src, exe = tmp / "fast_div.cpp", tmp / "fast_div"
    src.write_text(HARNESS)
    proc = subprocess.run(
        [cxx, "-std=c++17", "-O2", "-I", os.path.join(ROOT, "csrc"), str(src), "-o", str(exe)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return str(exe)


def run(exe, skew=0):
    out = subprocess.run([exe, str(skew)], capture_output=True, text=True, check=True).stdout
    checks, mismatches = map(int, out.split())
    return checks, mismatches


def test_fast_div_is_exact(harness):
    checks, mismatches = run(harness)
    assert checks > 10_000_000
    assert mismatches == 0


def test_a_wrong_multiplier_is_caught(harness):
    _, mismatches = run(harness, skew=-1)
    assert mismatches > 0
