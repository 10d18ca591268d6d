"""The keeper: the `rbee-mesh` command a person types into.

`cli.py` is the command line; `client.py` submits jobs to a queen and streams their frames;
`render.py` shows them; `daemon.py` runs queens and hives in the background; `doctor.py`
explains a hive that is not visible; `demo.py` is `rbee-mesh demo`.
"""
