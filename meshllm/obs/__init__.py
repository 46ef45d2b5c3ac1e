"""Observability: Prometheus metrics per node (``metrics``), logs that carry the node and the
request they are about (``logs``), progress bars that stay quiet off a terminal (``progress``).

A leaf package: besides ``meshllm.errors`` it imports the standard library,
``prometheus_client``, ``aiohttp`` (the ``/metrics`` route) and ``tqdm`` only, so the data plane
and the node can use it; the pure cores never do.
"""
