"""The admin API of a kvtier instance: lookup, pin/unpin, clear, stats, health over HTTP (its own port).

``service.AdminService`` does the work on an engine's tiers; ``app.create_app`` is the FastAPI app
(bearer-token auth, strict JSON models); ``server.AdminServer`` runs it on uvicorn in a thread of the
process that holds the engine (``kvtier serve``: vLLM's worker); ``client.AdminClient`` is the CLI's
httpx client. Off unless ``[admin] enabled``.
"""
