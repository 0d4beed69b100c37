"""Architecture rules that code review alone would let slip."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def imported_modules(path: pathlib.Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_core_never_imports_the_wire() -> None:
    offenders = []
    for package in ("scheduler", "loader"):
        for path in (ROOT / package).rglob("*.py"):
            for name in imported_modules(path):
                if name == "grpc" or name.startswith(("grpc.", "grpc_", "service")) or "_pb2" in name:
                    offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, offenders


def test_the_check_catches_a_wire_import(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from service.pb import pt2serve_pb2\nimport grpc\n")
    assert {"grpc", "service.pb.pt2serve_pb2"} <= imported_modules(bad)


def test_generated_modules_are_current() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
