"""Generated CSI v1.10 protobuf and gRPC code (from proto/csi.proto by `./dev proto`)."""
