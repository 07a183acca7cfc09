"""The standard gRPC health service with a bound on concurrent ``Watch`` streams.

Health stays open to every caller (the kubelet's probes carry no token), so each ``Watch``
stream is memory that anyone who can reach the port may hold; past the bound a new one gets
RESOURCE_EXHAUSTED, while ``Check``, which the probes use, is never refused. A ``Check`` of
a service the server does not report on is NOT_FOUND with a message that says so (grpc's
own servicer sends none).
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2


class BoundedHealthServicer(health.aio.HealthServicer):
    """``HealthServicer`` that serves at most ``max_watches`` ``Watch`` streams at once."""

    def __init__(self, max_watches: int) -> None:
        super().__init__()
        if max_watches < 0:
            raise ValueError(f"max_watches must be 0 or more, got {max_watches}")
        self.max_watches = max_watches
        self.active_watches = 0
        self._reported = {""}  # the server as a whole, which the base servicer reports

    async def set(self, service: str,
                  status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        self._reported.add(service)
        await super().set(service, status)

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        if request.service not in self._reported:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no health status for service {request.service[:64]!r}; "
                                "ask for '' (the whole server) or a service it serves")
        return await super().Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> None:
        # One event loop serves every call, so the check and the increment are atomic.
        if self.active_watches >= self.max_watches:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"at most {self.max_watches} health watches at once; "
                                "use Check or try again later")
        self.active_watches += 1
        try:
            await super().Watch(request, context)
        finally:
            self.active_watches -= 1
