"""`python -m hf_r2.reproduce CONFIG.yaml [--output-dir DIR] [--data-dir DIR] [--no-progress]`."""

from .cli import reproduce_command, reproduce_command_parser

__all__: list[str] = []

if __name__ == "__main__":
    raise SystemExit(reproduce_command(reproduce_command_parser().parse_args()))
