"""`python -m smrd`: the same entry point as the installed `smrd` script."""
from smrd.ops.cli import main
if __name__ == "__main__":
    raise SystemExit(main())
