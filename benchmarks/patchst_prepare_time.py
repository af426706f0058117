"""Wall time and peak RSS of `patchst_cpu`'s prepare step (target statistics + memory) on magnetic_tile's fit
images, for one memory sampling per process (peak RSS is per process).

Run: python benchmarks/patchst_prepare_time.py random; python benchmarks/patchst_prepare_time.py coreset
Appends a row to results/patchst_prepare_time.json; one thread (pin it with taskset for a cleaner number).
"""

from __future__ import annotations

import json
import resource
import sys
import time

import _common
import torch
from torch.utils.data import DataLoader

from kdad.config import load_config, method_config
from kdad.methods import get_method
from kdad.train import train_val_datasets


def main() -> None:
    sampling = sys.argv[1]
    torch.set_num_threads(1)
    cfg = load_config("patchst_cpu", [], [f"data.root={_common.CATEGORIES['magnetic_tile']}",
                                          f"model.memory_sampling={sampling}"])
    spec = get_method(cfg.method)
    torch.manual_seed(0)
    model = spec.Model(method_config(cfg))
    fit_images, _, _ = train_val_datasets(cfg)
    t = time.perf_counter()
    spec.prepare(model, DataLoader(fit_images, batch_size=16, shuffle=False), torch.device("cpu"))
    row = {"sampling": sampling, "seconds": round(time.perf_counter() - t, 1), "bank": list(model.bank.shape),
           "fit_images": len(fit_images),  # type: ignore[arg-type]
           "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "meta": _common.metadata()}
    print(json.dumps(row), flush=True)
    out = _common.RESULTS / "patchst_prepare_time.json"
    doc = json.loads(out.read_text()) if out.is_file() else {"question": __doc__.split("\n")[0], "rows": []}
    doc["rows"].append(row)
    _common.write_json(out, doc)


if __name__ == "__main__":
    main()
