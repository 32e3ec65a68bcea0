"""How parameters cross ranks: communicators (MPI and the in-process local backend, one
interface), models flattened into one contiguous buffer, and the communication graphs.

- ``comm``: ``Communicator``, ``LocalCommunicator``, ``MPICommunicator``.
- ``flat``: ``FlatParameters``, a model's parameters bound to one buffer.
- ``topology``: ProxyFL's exponential graph, ring, fully connected.
"""
