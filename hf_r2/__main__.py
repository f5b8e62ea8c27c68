"""`python -m hf_r2 ...`: the `hf-r2` command line ([`hf_r2.cli.main`])."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
