#!/usr/bin/env bash
# Regenerates the committed Python modules from grok_serve.proto (needs grpcio-tools; the server
# itself only needs grpcio and protobuf). Usage: services/gateway/proto/generate.sh [python]
#
# protoc runs from the repository root so the generated stub imports its messages as
# `services.gateway.proto.grok_serve_pb2` rather than as a top-level module.
set -euo pipefail
python="${1:-python3}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
cd "$root"
"$python" -m grpc_tools.protoc -I . \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  services/gateway/proto/grok_serve.proto
