"""Built-in models: ``tiny`` (random, for pipeline tests) and ``shapes`` (the trained toy world)."""
