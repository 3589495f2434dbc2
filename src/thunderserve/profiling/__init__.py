"""Profiling: measured latencies in (Vidur GPU profiles, the local engine) and their comparison with the cost model.

I/O lives here (reading CSV/JSON, timing the engine); the fitting itself is pure and lives in
`costmodel.fit` / `costmodel.calibration`.
"""
