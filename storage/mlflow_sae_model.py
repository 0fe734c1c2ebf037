"""An SAE as an MLflow pyfunc model, defined from code (MLflow's "models from code").

MLflow copies this file into every logged SAE model and runs it when the model is loaded; nothing is pickled. The
weights stay `sae_weights.safetensors` + `cfg.json` (the `sae` artifact), and the pure-torch `sae` library travels
with the model as a code path, so `mlflow.pyfunc.load_model("models:/NAME@champion")` and `mlflow models serve`
need only torch, safetensors, pydantic and numpy.

predict(x) takes raw activations, float32 [n, d_in] (the site's unnormalised values), and returns the codes
[n, d_sae]; `params={"output": "reconstruction"}` returns the reconstruction [n, d_in] in the same raw units.
This module is not imported by saeflow itself: it is only ever executed by MLflow.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel
from safetensors.torch import load_file

OUTPUTS = ("codes", "reconstruction")


class SAEPyfunc(PythonModel):
    # MLflow inspects predict's type hints when this class is defined, and without them prints advice to add some
    # for signature inference (two lines per SAE logged or loaded). The model is logged with an explicit
    # signature (storage/tracking.py), which MLflow enforces either way.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from saeflow.sae import build_sae, config_from_dict

        directory = context.artifacts["sae"]
        with open(os.path.join(directory, "cfg.json")) as f:
            cfg = json.load(f)
        self.sae = build_sae(config_from_dict(cfg["sae"]), cfg["d_in"])
        self.sae.load_state_dict(load_file(os.path.join(directory, "sae_weights.safetensors")))
        self.sae.eval()

    def predict(self, context, model_input, params=None) -> np.ndarray:
        output = (params or {}).get("output", "codes")
        if output not in OUTPUTS:
            raise ValueError(f"params.output must be one of {OUTPUTS}, not {output!r}")
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            y = self.sae.encode_raw(x) if output == "codes" else self.sae.reconstruct_raw(x)
        return y.numpy()


set_model(SAEPyfunc())
