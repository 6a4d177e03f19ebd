"""The MLflow pyfunc flavour of a registered ConvMAE model: MLflow's ``loader_module`` contract.

A logged model holds data only: ``data/convmae`` (``convmae.save_pretrained``: safetensors
weights, JSON config) beside MLflow's own ``MLmodel`` and environment files. Its code is this
module of the installed package, named in ``MLmodel`` as ``loader_module``: nothing in the
artifact store is code or a pickle, so whoever can write there cannot make a loader run code
(see ``service.tracking.registry.load_pyfunc``, which checks ``MLmodel`` names this module).

``mlflow.pyfunc.load_model(uri).predict(images)`` returns, for ``(N, 3, H, W)`` normalised
images, the encoder's pooled embeddings (pretrained models) or the class logits (fine-tuned
classifiers); ``service.tracking.registry.load_model(uri)`` returns the full ``convmae`` model for
fine-tuning and reconstruction.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.nn as nn


class ConvMAEPyfunc:
    """What ``mlflow.pyfunc.load_model`` wraps: ``predict`` on a batch of images."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        import torch

        from convmae import encoder_embedding

        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            if getattr(self.model, "num_classes", 0) > 0:  # a fine-tuned classifier
                return self.model(images).numpy()
            return encoder_embedding(self.model, images).numpy()


def _load_pyfunc(data_path: str) -> ConvMAEPyfunc:
    """MLflow's loader-module entry point (its name is MLflow's): the model from the logged
    ``save_pretrained`` folder, weights read as safetensors."""
    from convmae import load_pretrained

    return ConvMAEPyfunc(load_pretrained(data_path))
