"""The gRPC front of pt2serve: the server, its configuration and the Python client.

Names are imported on first use, so `import pt2serve.service.client` stays light (the
client needs neither the scheduler nor the model runtime)."""

from __future__ import annotations

from pt2serve.loader.lazy import lazy_exports

_EXPORTS = {
    "Pt2Server": "pt2serve.service.server",
    "ServerConfig": "pt2serve.service.config",
    "configure": "pt2serve.service.config",
    "load_config": "pt2serve.service.config",
    "Pt2ServeClient": "pt2serve.service.client",
}
__all__, __getattr__ = lazy_exports("pt2serve.service", _EXPORTS)
