"""The csi-addons Identity service: the csi-addons sidecar asks it who the driver is and which
csi-addons operations it offers before it calls any of them: where the node service runs,
EncryptionKeyRotation and ReclaimSpace ONLINE (NodeReclaimSpace); where the controller runs, ReclaimSpace
OFFLINE (ControllerReclaimSpace)."""

from __future__ import annotations

import grpc
from google.protobuf.wrappers_pb2 import BoolValue

from csi_luks.csiaddons import identity_pb2 as pb
from csi_luks.csiaddons import identity_pb2_grpc as pb_grpc
from csi_luks.readiness import ReadinessCheck


class CsiAddonsIdentityService(pb_grpc.IdentityServicer):  # type: ignore[misc]
    def __init__(
        self, driver_name: str, version: str, controller: bool, node: bool, readiness: ReadinessCheck
    ) -> None:
        self._driver_name = driver_name
        self._version = version
        self._readiness = readiness
        service = pb.Capability.Service
        reclaim = pb.Capability.ReclaimSpace
        self._capabilities = []
        if controller:
            self._capabilities += [
                pb.Capability(service=service(type=service.CONTROLLER_SERVICE)),
                pb.Capability(reclaim_space=reclaim(type=reclaim.OFFLINE)),
            ]
        if node:
            rotation = pb.Capability.EncryptionKeyRotation
            self._capabilities += [
                pb.Capability(service=service(type=service.NODE_SERVICE)),
                pb.Capability(encryption_key_rotation=rotation(type=rotation.ENCRYPTIONKEYROTATION)),
                pb.Capability(reclaim_space=reclaim(type=reclaim.ONLINE)),
            ]

    def GetIdentity(
        self, request: pb.GetIdentityRequest, context: grpc.ServicerContext
    ) -> pb.GetIdentityResponse:
        return pb.GetIdentityResponse(name=self._driver_name, vendor_version=self._version)

    def GetCapabilities(
        self, request: pb.GetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> pb.GetCapabilitiesResponse:
        return pb.GetCapabilitiesResponse(capabilities=self._capabilities)

    def Probe(self, request: pb.ProbeRequest, context: grpc.ServicerContext) -> pb.ProbeResponse:
        return pb.ProbeResponse(ready=BoolValue(value=self._readiness.check().ready))
