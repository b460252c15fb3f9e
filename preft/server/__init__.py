"""OpenAI-compatible HTTP server (``preft serve``): adapters as models, streaming, runtime adapter management.

- ``protocol``: request bodies, their ``SamplingParams``, the OpenAI error schema;
- ``engine_loop``: the one thread that drives the engine, and the queues to and from it;
- ``app``: the FastAPI routes;
- ``metrics``: Prometheus text format, by hand;
- ``default_model``: what is served when no model is named;
- ``cli``: ``preft serve``.
"""
