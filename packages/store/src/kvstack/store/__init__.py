"""The distributed KV-cache store: a master that places objects on memory contributed by store
nodes, replicas, leases, eviction and a disk tier; clients move bytes through kvstack.transfer.
"""

__all__: list[str] = []
