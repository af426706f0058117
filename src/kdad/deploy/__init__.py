"""Inference and deployment: the one home of every path from a trained model to a decision.

- `runner`: the `Runner` protocol and its three backends (eager torch, the fast path, ONNX Runtime);
  `make_runner` picks one for a checkpoint or an exported graph.
- `postprocess`: `PostProcess`, built from `Thresholds`: the decision rule `score >= threshold`, the pixel
  defect mask and the overlay display range, written once.
- `fast`: the inference fast path (BatchNorm folding, matrix map heads, bf16, torch.compile, CUDA graphs).
- `dataset`: a model or runner over a dataset, gathered into `Predictions` (test, thresholds, selection).
- `batch`: files, folders and globs streamed through a runner in bounded memory; the output table.
- `predict`: `kdad predict`: scores, decisions, overlays and masks written to a folder.
- `serve`: the FastAPI web service.

Submodules are imported on use: this package's import pulls in nothing heavy.
"""
