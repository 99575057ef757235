"""shir.core: the pure decision logic of a self-hosted integration runtime.

No I/O, no clocks, no threads: time is an argument, randomness a passed-in generator, and every
decision comes back as values (events and effects) for a driver to carry out.
"""
