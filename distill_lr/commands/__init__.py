"""The subcommands of ``distill-lr`` (``distill_lr.cli``), one module each."""
