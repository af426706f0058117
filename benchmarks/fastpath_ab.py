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

torch.set_num_threads(2)
spec=get_method("rd"); cfg=from_dict(spec.Config, read_preset("rd_cpu")["model"])
torch.manual_seed(0); m=spec.Model(cfg).eval()
fast=optimize_for_inference(m, "cpu", "fp32")
x=torch.rand(16,3,256,256)
with torch.inference_mode():
    fast(x); fast(x)
    ts=[]
    for _ in range(5):
        t=time.perf_counter(); fast(x); ts.append(time.perf_counter()-t)
ts.sort()
print(json.dumps({"tree": sys.argv[1], "img_per_s_median": round(16/ts[2],1), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss//1024}))
