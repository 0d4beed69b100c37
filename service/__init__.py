"""The gRPC front of pt2serve: the server, its configuration and the Python client.

Names are imported on first use, so `import pt2serve.service.client` stays light (the
client needs neither the scheduler nor the model runtime)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Pt2Server": "pt2serve.service.server",
    "ServerConfig": "pt2serve.service.config",
    "configure": "pt2serve.service.config",
    "load_config": "pt2serve.service.config",
    "Pt2ServeClient": "pt2serve.service.client",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pt2serve.service' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
