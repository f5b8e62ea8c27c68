"""The `hf-r2` sub-commands, one module each: `train`, `quant` (`ptq`, `qat`, `compress`, `evaluate`),
`reproduce` (`reproduce`, `demo`), `hub` (`push`, `download`) and `env`. Each is a
`<name>_command_parser(subparsers)` + `<name>_command(args)` pair, as in `accelerate.commands`; [`hf_r2.cli.main`]
registers them. Nothing in hf-r2 imports this package but `hf_r2.cli`: the library code lives below it."""
