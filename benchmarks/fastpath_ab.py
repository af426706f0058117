"""A/B of the inference fast path between two source trees (e.g. before and after a refactor), run alternately
on the same machine: rd_cpu (Lite0) at 256 px, batch 16, fp32, 2 threads; median of 5 batches after 2 warm-ups,
and the process's peak RSS.

Run: for t in old new; do PYTHONPATH=<tree>/src python benchmarks/fastpath_ab.py $t; done
"""
import json
import resource
import sys
import time

import torch

from kdad.config import from_dict, read_preset
from kdad.methods import get_method
from kdad.speed import optimize_for_inference


def main() -> None:
    torch.set_num_threads(2)
    spec = get_method("rd")
    cfg = from_dict(spec.Config, read_preset("rd_cpu")["model"])
    torch.manual_seed(0)
    fast = optimize_for_inference(spec.Model(cfg).eval(), "cpu", "fp32")
    x = torch.rand(16, 3, 256, 256)
    times = []
    with torch.inference_mode():
        for _ in range(2):
            fast(x)
        for _ in range(5):
            t = time.perf_counter()
            fast(x)
            times.append(time.perf_counter() - t)
    times.sort()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(json.dumps({"tree": sys.argv[1], "img_per_s_median": round(16 / times[2], 1), "peak_rss_mb": peak_mb}))


if __name__ == "__main__":
    main()
