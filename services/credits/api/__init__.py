"""HTTP API of the credit service (port 8001): routes per topic in `routes/`, their dependencies in `deps.py`."""

from services.credits.api.main import ApiContext, build_api

__all__ = ["ApiContext", "build_api"]
