"""Where the call-to-call spread of a Lite0 training step comes from: each step's wall time, CPU
time (user, system) and minor page faults, for the fcnfast model (native ops) and the plain-PyTorch
FCN alternating in one process (the models, inputs and step of bench_end_to_end.py: batch 4,
480x360, fp32, channels_last, SGD momentum).

    PYTHONPATH=. python benchmarks/step_faults.py --steps 4 --threads 2
"""

from __future__ import annotations

import argparse
import resource
import time

import bench_end_to_end as e2e  # benchmarks/bench_end_to_end.py: models, inputs, the step
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, plain, make_input, _ = e2e.build("lite0")
    for m in (model, plain):
        m.to(memory_format=torch.channels_last).train()
    images, target = make_input(4, (360, 480))
    steps = {
        name: e2e.train_step("lite0", model, net, fast, torch.channels_last)
        for name, net, fast in (("native", model, True), ("plain", plain, False))
    }
    for step in steps.values():
        step(images, target)  # warm-up: library init, optimizer state
    print("| step | implementation | wall ms | user ms | sys ms | minor faults |")
    print("|---:|---|---:|---:|---:|---:|")
    for i in range(args.steps):
        for name, step in steps.items():
            before = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            step(images, target)
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_SELF)
            print(
                "| %d | %s | %.0f | %.0f | %.0f | %d |"
                % (
                    i + 1,
                    name,
                    wall * 1e3,
                    (after.ru_utime - before.ru_utime) * 1e3,
                    (after.ru_stime - before.ru_stime) * 1e3,
                    after.ru_minflt - before.ru_minflt,
                )
            )


if __name__ == "__main__":
    main()
