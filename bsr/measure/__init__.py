"""Measurement (SPEC section 6): what a training step really costs, and `bsr bench`, which compares the methods.

`memory` (saved-for-backward bytes, peaks, sizes) and `flops` (FLOP counter, GMACs, matmul speed) measure
(`bsr.allocator`, below training, keeps peak RSS honest); `analytic` is the authors' formula, for comparison only;
`protocol` is the one measurement protocol of bench and study; `bench_spec`, `bench`, `worker` and `report` are
`bsr bench`.
"""

from .flops import count_flops, flop_counter, fwd_gmacs_per_image, matmul_gflops
from .memory import (OUTSIDE, ROOT, PeakWindow, SavedBytes, current_bytes, current_rss_bytes, grad_bytes,
                     optimizer_state_bytes, param_bytes, peak_bytes, reset_peak, saved_tensor_bytes, track_peak,
                     trainable_params)

__all__ = ["OUTSIDE", "ROOT", "PeakWindow", "SavedBytes", "count_flops", "current_bytes", "current_rss_bytes",
           "flop_counter", "fwd_gmacs_per_image", "grad_bytes", "matmul_gflops", "optimizer_state_bytes",
           "param_bytes", "peak_bytes", "reset_peak", "saved_tensor_bytes", "track_peak", "trainable_params"]
