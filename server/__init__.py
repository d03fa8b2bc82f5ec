"""The Forgedit gRPC service (``forgedit-server``): the wire around the engine and the registry.

Modules, one job each, in the order a request meets them:

- ``main``         ``create_server`` (numbered steps over the settings) and the entry point
- ``settings``     the one settings object (environment variables ``FORGEDIT_*``)
- ``lifecycle``    starting → ready → draining → stopped; readiness conditions; health
- ``auth``, ``interceptors``  the front door: tokens, draining, stream bounds, malformed
                   protobuf, per-call metrics
- ``service``      the ``ForgeditService`` servicer: requests in, event streams out
- ``wire``         every protobuf conversion: a request decoded once into typed options,
                   every event and resource message built
- ``plans``        a decoded call and the plan it becomes: the checks, in order
- ``validation``   the service's limits (sizes, counts, lengths, pixel budgets)
- ``catalog``      the served base models and sizes: the one compatibility and resolution check
- ``scheduler``    the device workers, and a job from submission to its end
- ``queueing``     the queue policy: order, overtakes, positions, the wait estimate
- ``job_table``    jobs by id and request id, retention
- ``jobs``         a job: its state, its cancel token and its bounded event replay buffer
- ``estimator``    run-time estimates by resolution (deadline check, retry hints)
- ``runner``       what a worker does for an Edit job and for a Sample job, as numbered steps
- ``registry_client``  the registry calls the server makes: bounded, per principal
- ``ports``        the small protocols the server needs from the engine and the registry
- ``errors``       the server's own errors and the one mapping of every error to a gRPC status
- ``transport``    message-size and keepalive options shared with the SDK, TLS credentials
- ``metrics``      Prometheus metrics on their own HTTP port
- ``logs``         structured logs with the job id on every line of a job

Nothing outside this package imports it.
"""
