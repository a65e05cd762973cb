"""The evaluation commands: ``python -m dino_jax.eval.<name>``.

Shell modules, one per command (knn, linear, attention, retrieval,
copy_detection, video); each runs ``dino_jax.cli.evals``. The evaluations
they run are the library package ``dino_jax.evaluation``.
"""
