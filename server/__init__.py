"""The Forgedit gRPC service (``forgedit-server``): the wire around the engine and the registry.

Modules, one job each:

- ``settings``    the one settings object (environment variables ``FORGEDIT_*``)
- ``transport``   message-size and keepalive options shared with the SDK, TLS credentials
- ``ports``       the small protocols the server needs from the engine and the registry
- ``errors``      the server's own errors and the one mapping of every error to a gRPC status
- ``validation``  request checks, before any decoding or model work
- ``wire``        every conversion between protobuf messages and enums and the domain
- ``jobs``        a job: its state, its cancel token and its bounded event replay buffer
- ``scheduler``   the queue and the per-device workers that own the engines; readiness
- ``estimator``   run-time estimates from measured rates (deadline check, retry hints)
- ``runner``      what a worker does for an Edit job and for a Sample job, as numbered steps
- ``registry_client``  the registry calls the server makes: bounded, per principal
- ``service``     the ``ForgeditService`` servicer: requests in, event streams out
- ``auth``        bearer-token interceptor; ``interceptors`` draining and per-call metrics
- ``metrics``     Prometheus metrics on their own HTTP port
- ``logs``        structured logs with the job id on every line of a job
- ``main``        ``create_server`` and the ``forgedit-server`` entry point

Nothing outside this package imports it.
"""
