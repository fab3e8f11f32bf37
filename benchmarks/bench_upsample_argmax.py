"""upsample_argmax (FCN-8s prediction: x8, crop 31 -> 500x500 labels) vs PyTorch.

torch: the op's definition, depthwise F.conv_transpose2d + slice + argmax(1)
(fcnfast.reference). fcnfast_unfused: fcnfast's bilinear_upsample2d + argmax(1),
to separate the fusion gain from the upsampling kernel's. extra_info holds the
PyTorch-allocator peak (torch_peak_mb) and the kernel's own scratch (scratch_mb).

    python -m pytest benchmarks/bench_upsample_argmax.py --benchmark-group-by=group
    (add --benchmark-timer=time.process_time for CPU time on a busy machine)
"""

import pytest
from _fcn_head import CASES, CROP, IDS, SCALE, run, scores, scratch_mb

from fcnfast import ops, reference

IMPLS = {
    "torch": lambda x: reference.upsample_argmax(x, SCALE, CROP),
    "fcnfast_unfused": lambda x: ops.bilinear_upsample2d(x, SCALE, CROP).argmax(1),
    "fcnfast": lambda x: ops.upsample_argmax(x, SCALE, CROP),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("classes,batch", CASES, ids=IDS)
def test_upsample_argmax(benchmark, impl, classes, batch):
    x = scores(classes, batch)
    if impl == "fcnfast":  # two interpolated input rows + value/best rows per thread
        benchmark.extra_info["scratch_mb"] = scratch_mb((2 * classes + 2) * CROP[3])
    run(benchmark, "upsample_argmax C=%d N=%d" % (classes, batch), IMPLS[impl], x)
