"""The CSI gRPC services: CSI vocabulary only; the work is done by the layers below."""
