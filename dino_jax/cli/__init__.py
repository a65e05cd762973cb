"""The shell: what runs the library as commands.

``flags`` (the shared flags, config files, ``--config.*`` overrides, the
one-line errors, the runner of the tools), ``evals`` (the evaluation
commands), ``console`` (help, output on several processes), ``lock`` (one
run per workdir), ``signals`` (the handlers that record SIGTERM / Ctrl-C
for the library to poll). The library (``dino_jax/*`` but ``cli``,
``main`` and the tools ``aot``, ``interop``, ``plot``) imports none of it.
"""
