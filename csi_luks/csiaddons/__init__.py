"""Generated csi-addons protobuf and gRPC code (from proto/csi-addons/ by `./dev proto`)."""
