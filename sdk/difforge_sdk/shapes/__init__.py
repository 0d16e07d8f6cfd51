"""The "shapes" demo: a procedural data set and a tiny FLUX.1-architecture model trained on it.

- :mod:`.data`: images of a coloured circle, square or triangle on a coloured background, captioned
  ``"a red circle on a blue background"``; :func:`.data.classify` reads the colours back from pixels.
- :mod:`.model`: the tiny configurations, tokenizers, random frozen text encoders and the AE training.
- :mod:`.train_demo_model`: the script that trains the model (the DiT with ``difforge train``) and
  writes ``model/`` (the files ``make demo`` uses by default) with its ``MODEL_CARD.md``.

Nothing here is imported by difforge itself; importing this package is light (no torch).
"""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "model"
"""The trained shapes model shipped with difforge-sdk (see ``model/MODEL_CARD.md``)."""

__all__ = ["MODEL_DIR"]
