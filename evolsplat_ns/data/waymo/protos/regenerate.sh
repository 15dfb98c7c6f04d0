#!/usr/bin/env bash
# Regenerate waymo_frame_pb2.py from waymo_frame.proto (a developer step; nothing runs this at
# install or run time).
#
# Why grpcio-tools 1.49.1: it bundles protoc 3.21.6, whose generated code uses the `builder`
# runtime API that exists from protobuf 3.20 on, so the file loads with nerfstudio's pin
# (protobuf<=3.20.3) and with protobuf 4.x. Newer protoc versions emit a runtime version check
# that protobuf 3.20 fails. It is installed into a throw-away venv so the project venv's
# protobuf stays untouched.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${PROTOC_VENV:-/tmp/evolsplat-protoc-venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --only-binary=:all: "grpcio-tools==1.49.1"
"$VENV/bin/python" -m grpc_tools.protoc -I. --python_out=. waymo_frame.proto
echo "wrote $(pwd)/waymo_frame_pb2.py"
