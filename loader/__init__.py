"""Loading AOTInductor packages: `ModelPackage` wraps one package on one device,
behind a `Runtime` (the C ABI, or torch's loader binding). Free of any wire protocol.

Names are imported on first use: the client reads the dtype table and the errors
without loading the runtime."""

from __future__ import annotations

from pt2serve.loader.lazy import lazy_exports

_EXPORTS = {
    "DTYPES": "pt2serve.loader.dtypes",
    "TYPES": "pt2serve.loader.dtypes",
    "ElementType": "pt2serve.loader.dtypes",
    "ErrorKind": "pt2serve.loader.errors",
    "Pt2ServeError": "pt2serve.loader.errors",
    "CallSpec": "pt2serve.loader.package",
    "LoadOptions": "pt2serve.loader.package",
    "ModelPackage": "pt2serve.loader.package",
    "load_metadata_from_package": "pt2serve.loader.package",
    "BindingRuntime": "pt2serve.loader.runtime",
    "NativeRuntime": "pt2serve.loader.runtime",
    "Runtime": "pt2serve.loader.runtime",
    "ConstantSpec": "pt2serve.loader.schema",
    "Dim": "pt2serve.loader.schema",
    "ModelSchema": "pt2serve.loader.schema",
    "TensorSpec": "pt2serve.loader.schema",
}
__all__, __getattr__ = lazy_exports("pt2serve.loader", _EXPORTS)
