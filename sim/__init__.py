"""shir.sim: a deterministic SimPy harness that drives the core through faults."""
