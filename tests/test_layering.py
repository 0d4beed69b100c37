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
            module = ("." * node.level) + (node.module or "")
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def wire_imports(path: pathlib.Path) -> list[str]:
    """Imports of gRPC, generated code or the service layer (relative imports that
    leave the package count: they could reach it)."""
    return sorted(
        name
        for name in imported_modules(path)
        if name == "grpc" or name.startswith(("grpc.", "grpc_", "pt2serve.service", "..")) or "_pb2" in name
    )


def test_core_never_imports_the_wire() -> None:
    offenders = []
    for package in ("scheduler", "loader"):
        for path in (ROOT / package).rglob("*.py"):
            offenders += [f"{path.relative_to(ROOT)} imports {name}" for name in wire_imports(path)]
    assert not offenders, offenders


def test_the_check_catches_a_wire_import(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from pt2serve.service.pb import pt2serve_pb2\nimport grpc\nfrom ..service import convert\n"
    )
    assert wire_imports(bad) == [
        "..service",
        "..service.convert",
        "grpc",
        "pt2serve.service.pb",
        "pt2serve.service.pb.pt2serve_pb2",
    ]


def test_the_client_runs_without_the_server_side() -> None:
    """Importing the client must not drag in the scheduler (nor torch's runners)."""
    code = (
        "import sys, pt2serve.service.client\n"
        "server_side = ('pt2serve.scheduler', 'pt2serve.loader.package')\n"
        "print(sorted(m for m in sys.modules if m.startswith(server_side)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# Sizes the layers are held to (generated code aside): a module past these is doing
# more than one job.
MAX_LINES = {"scheduler": 400, "service": 400}
MAX_MANAGER_LINES = 250


def test_modules_stay_small() -> None:
    too_long = []
    for package, limit in MAX_LINES.items():
        for path in (ROOT / package).glob("*.py"):
            lines = len(path.read_text().splitlines())
            if lines > limit:
                too_long.append(f"{path.relative_to(ROOT)}: {lines} lines (limit {limit})")
    manager = ROOT / "scheduler" / "manager.py"
    if manager.exists() and len(manager.read_text().splitlines()) > MAX_MANAGER_LINES:
        too_long.append(f"scheduler/manager.py over {MAX_MANAGER_LINES} lines")
    assert not too_long, too_long


def test_generated_modules_are_current() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
