"""Old home of the FastAPI app: see kdad.deploy.serve.app."""

from kdad.deploy.serve.app import STATIC_DIR, Limits, create_app, decode_upload, model_info, result_dict

__all__ = ["STATIC_DIR", "Limits", "create_app", "decode_upload", "model_info", "result_dict"]
