"""`python -m rbee_mesh` is the `rbee-mesh` command."""

from rbee_mesh.cli import run

if __name__ == "__main__":
    run()
