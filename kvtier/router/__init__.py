"""``kvtier router``: an OpenAI-compatible HTTP front over several instances, KV-aware and load-aware.

``scoring`` ranks instances (pure); ``backends`` holds what the router knows of each instance (its
KV-event index, health, load); ``proxy`` is the FastAPI app that tokenizes a request (through an
instance's ``/tokenize``), ranks, forwards (streaming passed through) and retries a request that
never started on the next instance.
"""
