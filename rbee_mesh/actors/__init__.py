"""The actors of a mesh (one package each: queen, hive, worker, keeper), what every actor
shares to serve, submit and forward jobs (jobserver, jobclient, heartbeat, narration), and
mesh.py, which composes actors into a mesh."""
