"""The application layer of memopt-func: the ``memopt-func`` command line and what it runs.

``cli`` (the entry, also ``python -m memopt_func``), ``common`` (argument types, tables, plots,
progress bars shared by the subcommands), ``demo``, ``lm``, ``surfaces``, ``bench_report``,
``benchmarking`` (step timing and the byte roofline, also used by ``bench/``), ``catalog`` (the
optimizers known by name) and ``functional_example`` (the functional guide's ``torch.func`` loop). The
library in ``memopt_func`` never imports from here.
"""
