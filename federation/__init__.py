"""The federation engine: transport, topologies, privacy, models, data, algorithms, round loop.

It reads patch bags, never slide files.
"""
