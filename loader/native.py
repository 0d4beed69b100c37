"""A model container driven through the model .so's C ABI, without the GIL.

torch's Python binding (`AOTIModelPackageLoader.run`/`boxed_run`) holds the GIL
for a whole run, so two runners never compute at once and the event loop stalls
while a batch runs. The compiled model exports the C functions of
`torch/csrc/inductor/aoti_runtime/interface.h`; ctypes releases the GIL around
each foreign call. Tensors cross the boundary as AtenTensorHandles made and
adopted by torch's own `torch._C._aoti` helpers.

The binding stays the reference implementation (`LoadOptions.runtime="binding"`);
tests check that both give the same outputs.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
import threading
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pt2serve.loader.errors import ExecutionFailed, PackageError

_api = ctypes.pythonapi
_api.PyCapsule_GetPointer.restype = ctypes.c_void_p
_api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_api.PyCapsule_New.restype = ctypes.py_object
_api.PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]

_handle = ctypes.c_void_p
_size = ctypes.c_size_t


class _ConstantEntry(ctypes.Structure):
    # struct AOTInductorConstantMapEntry { const char* name; AtenTensorHandle handle; }
    _fields_ = [("name", ctypes.c_char_p), ("handle", ctypes.c_void_p)]


_SIGNATURES: dict[str, list[Any]] = {
    "AOTInductorModelContainerCreateWithDevice": [
        ctypes.POINTER(_handle),
        _size,
        ctypes.c_char_p,
        ctypes.c_char_p,
    ],
    "AOTInductorModelContainerDelete": [_handle],
    "AOTInductorModelContainerRun": [
        _handle,
        ctypes.c_void_p,
        _size,
        ctypes.c_void_p,
        _size,
        _handle,
        _handle,
    ],
    "AOTInductorModelContainerRunSingleThreaded": [
        _handle,
        ctypes.c_void_p,
        _size,
        ctypes.c_void_p,
        _size,
        _handle,
        _handle,
    ],
    "AOTInductorModelContainerGetNumOutputs": [_handle, ctypes.POINTER(_size)],
    "AOTInductorModelContainerGetNumInputs": [_handle, ctypes.POINTER(_size)],
    "AOTInductorModelContainerGetCallSpec": [
        _handle,
        ctypes.POINTER(ctypes.c_char_p),
        ctypes.POINTER(ctypes.c_char_p),
    ],
    "AOTInductorModelContainerUpdateConstantBufferPairs": [
        _handle,
        ctypes.POINTER(_ConstantEntry),
        _size,
        ctypes.c_bool,
        ctypes.c_bool,
    ],
    "AOTInductorModelContainerSwapConstantBuffer": [_handle],
}


def _to_handles(tensors: Sequence[torch.Tensor]) -> list[int]:
    """New AtenTensorHandles (owned) for `tensors`, as integers."""
    capsules = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(list(tensors))
    return [_api.PyCapsule_GetPointer(c, None) for c in capsules]


def _adopt(handles: Sequence[int]) -> list[torch.Tensor]:
    """Tensors that take ownership of AtenTensorHandles returned by the runtime."""
    capsules = [_api.PyCapsule_New(h, None, None) for h in handles]
    tensors: list[torch.Tensor] = torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs(capsules)
    return tensors


EXTRACT_PREFIX = "pt2serve-"
# A supervisor's run directory (service/supervisor.py): `pt2serve-run-<pid>-<random>`.
RUN_PREFIX = "pt2serve-run-"


def clean_stale_extractions(directory: str | None = None) -> list[str]:
    """Remove the extraction dirs and run dirs of pt2serve processes that no longer
    run (a process killed with SIGKILL cannot clean up), matched by the owner's pid
    in the name; never a live process's. Returns the removed paths."""
    removed = []
    base = directory or tempfile.gettempdir()
    for entry in os.scandir(base):
        name = entry.name
        if not (entry.is_dir(follow_symlinks=False) and name.startswith(EXTRACT_PREFIX)):
            continue
        # Only `pt2serve-<pid>-<random>`, as extract_model_files names them, and
        # `pt2serve-run-<pid>-<random>`: never another pt2serve directory whose
        # random part happens to be all digits.
        owned = name[len(RUN_PREFIX) :] if name.startswith(RUN_PREFIX) else name[len(EXTRACT_PREFIX) :]
        pid_text, dash, _ = owned.partition("-")
        if not (dash and pid_text.isdigit()) or _alive(int(pid_text)):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def extract_model_files(package: str, model_name: str) -> tuple[str, str]:
    """Extract the model's compiled files to a private temp dir; return (dir, .so path)."""
    prefix = f"data/aotinductor/{model_name}/"
    try:
        with zipfile.ZipFile(package) as archive:
            members = [n for n in archive.namelist() if prefix in n and not n.endswith("/")]
            libraries = [n for n in members if n.endswith(".so")]
            if len(libraries) != 1:
                raise PackageError(
                    f"{package!r}: expected one .so for model {model_name!r}, found {len(libraries)}"
                )
            directory = tempfile.mkdtemp(prefix=f"{EXTRACT_PREFIX}{os.getpid()}-")
            try:
                for name in members:
                    target = os.path.join(directory, os.path.basename(name))
                    with archive.open(name) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
            except BaseException:
                shutil.rmtree(directory, ignore_errors=True)
                raise
    except zipfile.BadZipFile as exc:
        raise PackageError(f"{package!r} is not a .pt2 package: {exc}") from exc
    return directory, os.path.join(directory, os.path.basename(libraries[0]))


class NativeContainer:
    """`num_runners` model instances in one container; `run` is thread-safe."""

    def __init__(
        self, package: str, model_name: str, *, num_runners: int, device: str, single_threaded: bool
    ) -> None:
        directory, library = extract_model_files(package, model_name)
        try:
            try:
                self._lib = ctypes.CDLL(library)
                for name, argtypes in _SIGNATURES.items():
                    function = getattr(self._lib, name)
                    function.argtypes = argtypes
                    function.restype = ctypes.c_int32
            except (OSError, AttributeError) as exc:
                raise PackageError(f"{package!r}: the model library lacks the AOTI C ABI: {exc}") from exc
            self._container = _handle()
            self._check(
                self._lib.AOTInductorModelContainerCreateWithDevice(
                    ctypes.byref(self._container),
                    num_runners,
                    device.encode(),
                    directory.encode(),
                ),
                "create the model container",
                PackageError,
            )
        finally:
            if device == "cpu":
                # The library is mapped now; nothing is read from disk again on CPU.
                shutil.rmtree(directory, ignore_errors=True)
        self._directory = None if device == "cpu" else directory
        self._run = (
            self._lib.AOTInductorModelContainerRunSingleThreaded
            if single_threaded
            else self._lib.AOTInductorModelContainerRun
        )
        self.num_inputs = self._count("AOTInductorModelContainerGetNumInputs")
        self.num_outputs = self._count("AOTInductorModelContainerGetNumOutputs")
        self._handles_in = ctypes.c_void_p * self.num_inputs
        self._handles_out = ctypes.c_void_p * self.num_outputs
        self._closed = False
        self._lock = threading.Lock()

    def _count(self, function: str) -> int:
        value = _size()
        self._check(
            getattr(self._lib, function)(self._container, ctypes.byref(value)), function, PackageError
        )
        return int(value.value)

    @staticmethod
    def _check(code: int, what: str, error: type[Exception] = ExecutionFailed) -> None:
        if code != 0:
            raise error(
                f"the AOTI runtime failed to {what} (error code {code}; its message is in the server log)"
            )

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(inputs) != self.num_inputs:
            raise ExecutionFailed(f"expected {self.num_inputs} inputs, got {len(inputs)}")
        handles = self._handles_in(*_to_handles(inputs))  # stolen by the runtime
        outputs = self._handles_out()
        code = self._run(self._container, handles, self.num_inputs, outputs, self.num_outputs, None, None)
        if code:
            self._check(code, "run the model")
        return _adopt([handle or 0 for handle in outputs])

    def call_spec(self) -> tuple[str, str]:
        in_spec = ctypes.c_char_p()
        out_spec = ctypes.c_char_p()
        self._check(
            self._lib.AOTInductorModelContainerGetCallSpec(
                self._container, ctypes.byref(in_spec), ctypes.byref(out_spec)
            ),
            "read the call spec",
        )
        return (in_spec.value or b"").decode(), (out_spec.value or b"").decode()

    def update_constants(
        self, tensors: Mapping[str, torch.Tensor], *, use_inactive: bool, validate_full: bool
    ) -> None:
        """Copy `tensors` (by internal name, already validated) into a constant buffer."""
        names = [name.encode() for name in tensors]
        handles = _to_handles(list(tensors.values()))
        try:
            entries = (_ConstantEntry * len(names))(
                *(_ConstantEntry(n, h) for n, h in zip(names, handles, strict=True))
            )
            self._check(
                self._lib.AOTInductorModelContainerUpdateConstantBufferPairs(
                    self._container, entries, len(names), use_inactive, validate_full
                ),
                "update constants",
            )
        finally:
            # The runtime copied the data; the handles are still ours to free.
            _adopt(handles)

    def swap_constant_buffer(self) -> None:
        self._check(
            self._lib.AOTInductorModelContainerSwapConstantBuffer(self._container), "swap constant buffers"
        )

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._lib.AOTInductorModelContainerDelete(self._container)
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
