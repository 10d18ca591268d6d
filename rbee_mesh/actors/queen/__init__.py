"""The queen: one per mesh. Takes jobs from keepers, routes or schedules them onto hives.

`queen.py` is the actor; `hives.py` its view of the hives (links, liveness, heartbeats);
`scheduler.py` where an inference runs; `config.py` the static peers of the config file.
"""
