"""One module per ``icot`` subcommand; each has ``add_parser(subparsers)`` and the handler it registers.

Commands are the top library layer: they may import everything below them (docs/architecture.md) and are
imported only by :mod:`icot_jax.cli`.
"""
