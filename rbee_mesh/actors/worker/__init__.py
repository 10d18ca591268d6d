"""The worker: one process per loaded model, serving inference jobs for its hive.

Run as ``python -m rbee_mesh.actors.worker`` by the hive's worker pool; `worker.py` is the
actor and its command line.
"""
