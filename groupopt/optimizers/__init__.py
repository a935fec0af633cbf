"""Update rules, one torch optimizer a module (see :class:`groupopt.optimizers.base.Rule`)."""
