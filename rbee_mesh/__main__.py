"""`python -m rbee_mesh` is the `rbee-mesh` command."""

from rbee_mesh.actors.keeper.cli import run

if __name__ == "__main__":
    run()
