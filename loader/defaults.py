"""Defaults of a served model, in one place: config files, flags, RPCs and the
Python API all fall back to these."""

from __future__ import annotations

# The model inside a .pt2 package (aoti_compile_and_package's default).
MODEL_NAME = "model"
# "native": the model's C ABI without the GIL; "binding": torch's loader binding.
RUNTIME = "native"
RUNTIMES = ("native", "binding")
NUM_RUNNERS = 1
# -1: the device the package was compiled for, at its default index.
DEVICE_INDICES: tuple[int, ...] = (-1,)
# Rows per batch when neither the config nor the package bounds it, and the bound
# `pt2serve build` compiles the batch dimension with.
MAX_BATCH = 64
