"""The keeper: the `rbee-mesh` command a person types into.

`cli.py` is the command tree, which imports nothing heavy; `session.py` is what a command runs
in trio (a job, a chat, a mesh for one command); `client.py` submits jobs to a queen and streams
their frames; `render.py` shows them; `exits.py` holds the exit codes; `daemon.py` starts and
stops queens and hives in the background, `serving.py` is what such a daemon runs; `doctor.py`
explains a hive that is not visible; `demo.py` is `rbee-mesh demo`.
"""
