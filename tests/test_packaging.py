"""The distribution: a wheel that installs one top-level name, `pt2serve`."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_wheel_claims_only_pt2serve(tmp_path: pathlib.Path) -> None:
    """Build the wheel, install it into a fresh venv, import it from there."""
    # Built from a copy of what the wheel takes: a build/ folder left in the checkout
    # would carry modules that no longer exist into the wheel.
    source = tmp_path / "source"
    for name in ("service", "scheduler", "loader"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, "."],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("pt2serve-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
        names = set(archive.namelist())
    assert {t for t in tops if not t.endswith(".dist-info")} == {"pt2serve"}
    modules = ("service/cli.py", "service/pb/pt2serve_pb2.py", "scheduler/batcher.py", "loader/package.py")
    assert {f"pt2serve/{m}" for m in modules} <= names
    assert "pt2serve/__init__.py" not in names, "pt2serve is a namespace package"
    assert {"pt2serve/service/py.typed", "pt2serve/scheduler/py.typed", "pt2serve/loader/py.typed"} <= names
    assert "pt2serve/service/grpc_service_config.json" in names

    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=False)
    python = fresh / "bin" / "python"
    site = pathlib.Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    before = set(p.name for p in site.iterdir())
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
    )
    added = {p.name for p in site.iterdir()} - before
    assert {n for n in added if not n.endswith(".dist-info")} == {"pt2serve"}, added

    # The dependencies come from this environment's site-packages, placed after the
    # fresh venv's own (a plain path entry: its editable-install hook does not run).
    deps = sysconfig.get_paths()["purelib"]
    code = (
        "import pt2serve.service.cli as cli, pt2serve.scheduler, pt2serve.loader\n"
        "import importlib.util as u\n"
        "print(cli.__file__)\n"
        "print(all(u.find_spec(n) is None for n in ('service', 'scheduler', 'loader')))\n"
    )
    result = subprocess.run(
        [str(python), "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env={"PYTHONPATH": deps, "PATH": "/usr/bin:/bin"},
    )
    location, no_bare_names = result.stdout.split()
    assert pathlib.Path(location).is_relative_to(site), location
    assert no_bare_names == "True"
    script = fresh / "bin" / "pt2serve"
    assert script.exists()
    helped = subprocess.run(
        [str(script), "constants", "rollout", "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={"PYTHONPATH": deps, "PATH": "/usr/bin:/bin"},
    )
    assert helped.returncode == 0 and "--targets" in helped.stdout, helped.stderr
