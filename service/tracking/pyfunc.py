"""The MLflow pyfunc flavour of a registered ConvMAE model, logged as "model from code".

Logging from code (not a pickled object) means loading a registered model never unpickles
anything: the weights are safetensors and the config is JSON (``convmae.save_pretrained``).
``mlflow.pyfunc.load_model(uri).predict(images)`` returns, for ``(N, 3, H, W)`` normalised
images, the encoder's pooled embeddings (pretrained models) or the class logits (fine-tuned
classifiers); ``service.tracking.registry.load_model(uri)`` returns the full ``convmae`` model for
fine-tuning and reconstruction.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np


class ConvMAEPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from convmae import load_pretrained

        self.model = load_pretrained(context.artifacts["convmae"]).eval()

    def predict(self, context, model_input, params=None):  # untyped: MLflow infers no schema from it
        import torch

        from convmae import encoder_embedding

        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            if getattr(self.model, "num_classes", 0) > 0:  # a fine-tuned classifier
                return self.model(images).numpy()
            return encoder_embedding(self.model, images).numpy()


mlflow.models.set_model(ConvMAEPyfunc())
