"""Runtime: executes a Plan for real (engine, KV transfer, workers, router, API, launchers)."""
