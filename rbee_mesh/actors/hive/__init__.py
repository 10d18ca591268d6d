"""The hive: one per machine. Its devices, model catalog and downloads, and worker processes.

`hive.py` is the actor; `devices.py` the GPUs and the CPU; `catalog.py` the models on disk;
`download.py` fetches them from the hub; `worker_pool.py` starts, watches and stops workers.
"""
