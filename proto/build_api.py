"""Generate the Python code of proto/pdllm_api.proto (messages, stubs, type stubs) with grpc_tools.protoc.

Run `python proto/build_api.py` after editing the .proto; the generated files are committed, never hand-edited.
protoc writes `import pdllm_api_pb2`; the stubs live in the `pdllm.proto` package, so that import is rewritten.
(Stand-in until the shared proto/build.py, which builds every .proto the same way, replaces it.)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
PROTOS = ("pdllm_api.proto",)


def build(proto: str) -> None:
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto shipped with grpc_tools
    args = ["protoc", f"-I{HERE}", f"-I{include}", f"--python_out={HERE}", f"--pyi_out={HERE}"]
    args += [f"--grpc_python_out={HERE}", str(HERE / proto)]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {proto}")
    stem = proto.removesuffix(".proto")
    for path in HERE.glob(f"{stem}_pb2*.py*"):
        text = path.read_text()
        fixed = re.sub(r"^import (\w+_pb2) as ", r"from pdllm.proto import \1 as ", text, flags=re.M)
        path.write_text(fixed)


def main() -> int:
    for proto in PROTOS:
        build(proto)
        print(f"generated {proto}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
