"""Forgedit: text-guided image editing by learning and forgetting (Zhang et al., 2023).

The library in reading order: ``config`` (every number that affects results), ``models`` and
``caption`` (loading), ``images`` (preprocessing), ``training`` (learning the image),
``interpolation`` (vs/vp), ``forgetting`` (strategies), ``weights`` (in-place swaps),
``sampling`` (DDIM + guidance), ``delta`` (how Δ is stored: fp32, fp16, int8), ``artifact``
(the edit model on disk), ``preview`` (the training-free preview and x0 previews, not part of
the original), and ``engine``, which ties them together. Around it: ``options`` and
``requests`` (a request as typed options named as the gRPC contract names them, and the one
builder of configs and seeds from them, shared by the CLI and the server), ``zoo`` (the
built-in base models, e.g. the random tiny one) and ``cli`` (``python -m forgedit``). Heavy
imports (torch, diffusers, transformers) happen in those modules, not here.
"""

__version__ = "0.1.0"
