"""The Faust worker's wiring: the app, its agent and tables, batching, sweep, gaps, lifeline."""
