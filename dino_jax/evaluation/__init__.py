"""The evaluations: k-NN, linear probe, attention maps and masks, retrieval,
copy detection, video segmentation; each a function of (config, mesh,
backbone, params, options). Their commands are ``dino_jax.eval.<name>``.
"""
