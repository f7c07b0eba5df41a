"""A workload for Nsight Compute: three fp32 forward + backward passes of the Triton scan (channels-last inputs, as
``bench_scan.py`` builds them) at one shape, by default issue 4's anchor (2, 64, 64^3, 1 group).

    ncu --kernel-name regex:"_chunk_kernel|_bsum_kernel|_bwd_kernel" --launch-skip 4 --launch-count 4 \\
        --metrics 'regex:sm__inst_executed_pipe_(xu|fma|fmaheavy|fmalite|alu|lsu|uniform)\\.avg\\.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active,gpu__time_duration.sum,regex:smsp__average_warps_issue_stalled_(long_scoreboard|short_scoreboard|wait|math_pipe_throttle|mio_throttle|not_selected|selected|dispatch_stall)_per_issue_active\\.ratio' \\
        python kernels/ncu_scan.py [b d L groups]

gives each scan kernel's pipe use, issue rate and stall reasons (the table in
benchmarks/results/train_step_h200_session21.md; the GPU image has ncu at /usr/local/cuda/bin/ncu). Skipping 4
launches skips the first pass's kernels, whose time includes compilation. ncu fixes the SM clock at 1.47 GHz on the
H200, so its durations are longer than bench_scan.py's times.
"""
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_scan as bs  # noqa: E402

shape = [int(v) for v in sys.argv[1:5]] if len(sys.argv) > 1 else [2, 64, 64 ** 3, 1]
x, gy, call = bs.scan_call(bs.triton_scan, *shape)
run = bs.fwd_bwd(x, gy, call)
for _ in range(3):
    run()
torch.cuda.synchronize()
