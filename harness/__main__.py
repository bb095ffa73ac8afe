"""`python -m harness` is the `harness` command (tune starts its worker processes this way)."""
from harness.cli import cli

if __name__ == "__main__":
    cli(prog_name="harness")
