"""detjax: bit-identical deep learning on medical data with JAX/Flax.

Structured orthogonal initialisation (:mod:`detjax.initializers`), golden-ratio batch
order (:mod:`detjax.ordering`), deterministic runtime configuration
(:mod:`detjax.determinism`), canonical hashes of training state (:mod:`detjax.hashing`),
a pure jitted training engine (:mod:`detjax.train`) and orbax checkpoints whose content
is verified on restore (:mod:`detjax.checkpoint`).

Importing :mod:`detjax` does not start the JAX backend, so
``detjax.determinism.configure()`` can still be called afterwards.
"""

__version__ = "0.1.0"
