"""The FastAPI service: app factory, settings, routes, micro-batcher, job runner and store. It runs
the engine in pipelines/ and holds nothing else (benchmarks and the test launcher live in tests/)."""
