"""CSI Identity service: who the plugin is, what it offers, whether it is ready."""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf.wrappers_pb2 import BoolValue

from csi_luks.csi import csi_pb2, csi_pb2_grpc
from csi_luks.readiness import ReadinessCheck


class IdentityService(csi_pb2_grpc.IdentityServicer):  # type: ignore[misc]
    def __init__(
        self,
        driver_name: str,
        version: str,
        capabilities: Iterable[csi_pb2.PluginCapability],
        readiness: ReadinessCheck,
    ) -> None:
        self._driver_name = driver_name
        self._version = version
        self._capabilities = list(capabilities)
        self._readiness = readiness

    def GetPluginInfo(
        self, request: csi_pb2.GetPluginInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=self._driver_name, vendor_version=self._version)

    def GetPluginCapabilities(
        self, request: csi_pb2.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=self._capabilities)

    def Probe(self, request: csi_pb2.ProbeRequest, context: grpc.ServicerContext) -> csi_pb2.ProbeResponse:
        # Not ready is an answer, not an error: the liveness sidecar keeps the pod and logs the reason.
        return csi_pb2.ProbeResponse(ready=BoolValue(value=self._readiness.check().ready))
