"""Web service: `create_app(runner)` (FastAPI) and `serve(...)` (uvicorn); see docs/deployment.md."""

from __future__ import annotations

from typing import Any

from kdad.errors import require_extra

require_extra("serve", ("fastapi", "uvicorn", "prometheus_client"), "kdad serve")  # before app.py imports fastapi

from kdad.deploy.serve.app import Limits, create_app  # noqa: E402


def serve(
    runner: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_mb: float = 20.0,
    log_level: str = "info",
    max_megapixels: float | None = None,
) -> None:
    """Run the app for `runner` with uvicorn until interrupted (one process; model calls serialised)."""
    import uvicorn

    app = create_app(runner, max_upload_mb=max_upload_mb, max_megapixels=max_megapixels)
    info = runner.info()
    print(
        f"kdad serve: {info.get('method')} on {info.get('backend')}; web page http://{host}:{port}/ , "
        f"API docs http://{host}:{port}/docs (schema /openapi.json)"
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level)


__all__ = ["Limits", "create_app", "serve"]
