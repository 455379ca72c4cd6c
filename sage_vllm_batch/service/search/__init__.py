"""``/v1/search``: the serve config's job store, searched with the service's embedding model."""
