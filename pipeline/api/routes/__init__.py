"""The worker's web API, one module per group of routes; each ``register``s its views
with a :class:`meterstream.api.http.Routes`."""
