"""Generated protobuf and gRPC modules for grok_serve.proto (regenerate with generate.sh)."""
