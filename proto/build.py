"""Generate the Python code of every .proto in proto/ (messages, gRPC stubs, type stubs) with grpc_tools.protoc.

Run `python proto/build.py` after editing or adding a .proto; the generated files are committed, never hand-edited.
protoc writes `import x_pb2`; the stubs live in the `pdllm.proto` package, so those imports are rewritten.
The generated code checks the protobuf runtime at import: it needs protobuf >= the version named in the header of
each *_pb2.py ("Protobuf Python Version"), i.e. the one bundled with the grpcio-tools that generated it.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def protos(src: Path = HERE) -> list[Path]:
    return sorted(src.glob("*.proto"))


def fix_imports(text: str) -> str:
    """`import foo_pb2 as x` -> `from pdllm.proto import foo_pb2 as x` (google.protobuf imports stay)."""
    return re.sub(r"^import (\w+_pb2) as ", r"from pdllm.proto import \1 as ", text, flags=re.M)


def build(proto: Path, out_dir: Path) -> list[Path]:
    """Generate the code of one .proto into out_dir; returns the files written."""
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto shipped with grpc_tools
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{proto.parent}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}"]
        args += [f"--grpc_python_out={tmp}", str(proto)]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto.name}")
        written = []
        for path in sorted(Path(tmp).iterdir()):
            if path.name.endswith(GENERATED_SUFFIXES):
                target = out_dir / path.name
                target.write_text(fix_imports(path.read_text()))
                written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="where to write the generated files (default proto/)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for proto in protos():
        for path in build(proto, args.out):
            print(f"generated {path.relative_to(args.out) if args.out != HERE else path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
