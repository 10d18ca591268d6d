"""`python -m rbee_mesh.actors.worker`: one worker process (started by its hive)."""

import sys

from rbee_mesh.actors.worker.worker import main

if __name__ == "__main__":
    sys.exit(main())
