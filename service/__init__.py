"""The lamb-sharded optimizer service: server, worker client, CLI.

A thin layer over the pure `lamb_sharded` library; nothing here is imported by it.
"""
