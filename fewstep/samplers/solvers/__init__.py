"""One module per solver family; importing :mod:`fewstep.samplers` registers them all."""
