"""Old home of the web service: see kdad.deploy.serve."""

from kdad.errors import require_extra

require_extra("serve", ("fastapi", "uvicorn"), "kdad serve")  # also when kdad.deploy.serve was imported before

from kdad.deploy.serve import Limits, create_app, serve  # noqa: E402

__all__ = ["Limits", "create_app", "serve"]
