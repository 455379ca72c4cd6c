"""The HTTP server: the front (API key, body limit, routing by model), the app (vLLM's apps plus
our families' routers and the error handler) and the launcher (``mode=serve``)."""
