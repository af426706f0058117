"""kdad: knowledge-distillation anomaly detection."""

__version__ = "0.1.0"

