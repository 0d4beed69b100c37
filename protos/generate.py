"""Regenerate the Python modules in service/pb from protos/.

Run `python protos/generate.py`; `python protos/generate.py --check` fails when the
committed modules differ from what the .proto files generate (CI runs it).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import tempfile

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "service" / "pb"
# protoc writes absolute imports (`from pt2serve.v1 import x_pb2`); the modules
# live flat in service/pb, so imports between them become relative.
_IMPORT = re.compile(r"^from pt2serve(?:\.\w+)+ import (\w+_pb2)", re.MULTILINE)
# Descriptors go into service/pb's own pool (see service/pb/__init__.py).
_DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
_OWN_POOL = "from . import POOL as _POOL\nDESCRIPTOR = _POOL.AddSerializedFile("


def generate(dest: pathlib.Path) -> list[pathlib.Path]:
    import grpc_tools

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *map(str, protos),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        written = []
        for path in sorted(pathlib.Path(tmp).rglob("*_pb2*.py*")):
            text = _IMPORT.sub(r"from . import \1", path.read_text()).replace(_DEFAULT_POOL, _OWN_POOL)
            target = dest / path.name
            target.write_text(text)
            written.append(target)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if service/pb is stale")
    args = parser.parse_args()
    if not args.check:
        for path in generate(OUT):
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_text() for p in generate(pathlib.Path(tmp))}
    current = {p.name: p.read_text() for p in OUT.glob("*_pb2*.py*")}
    if fresh != current:
        stale = sorted(set(fresh) ^ set(current) | {n for n in fresh if fresh[n] != current.get(n)})
        print(f"service/pb is stale ({', '.join(stale)}): run python protos/generate.py")
        return 1
    print("service/pb is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
