"""SAELens interop: write any exportable saeflow SAE as a SAELens inference directory, and read one back.

The on-disk format is SAELens' own (checked against sae-lens 6.54.12, `sae_lens/saes/*.py` and
`sae_lens/loading/pretrained_sae_loaders.py`): a directory with
- `sae_weights.safetensors`: the inference module's `state_dict()` and nothing else, since SAELens loads it with
  `load_state_dict(..., assign=True)`, strict. W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_dec [d_in], plus
  b_enc [d_sae] (standard, topk, jumprelu), threshold [d_sae] (jumprelu), b_gate, b_mag, r_mag [d_sae] (gated;
  gated has no b_enc);
- `cfg.json`: `SAEConfig.to_dict()` — d_in, d_sae, dtype, device, apply_b_dec_to_input, normalize_activations,
  reshape_activations, architecture, the architecture's fields (topk: k, rescale_acts_by_decoder_norm) and a free
  `metadata` dict (hook_name, model_name, sae_lens_version, ...). SAELens ≥ 6 keeps hook_name under metadata, and
  treats a config without metadata.sae_lens_version as a pre-6.0 one, so we always write it.

Export folds the normalization scale c (MATH §4.1) into the weights, as SAELens' own
`fold_activation_norm_scaling_factor` does, so the exported SAE takes raw activations:
π = (c·x − b_dec) W_enc + b_enc = (x − b_dec/c)(c·W_enc) + b_enc and x̂_raw = (f W_dec + b_dec)/c, hence
W_enc' = c·W_enc, W_dec' = W_dec/c, b_dec' = b_dec/c. π itself is unchanged, so biases and thresholds are too; for
gated, W_mag = W_enc ⊙ exp(r_mag) scales with W_enc, so r_mag, b_gate and b_mag stay as they are.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from saeflow.sae.architectures.base import SAE
from saeflow.sae.architectures.batchtopk import BatchTopKSAE
from saeflow.sae.architectures.gated import GatedConfig
from saeflow.sae.architectures.jumprelu import JumpReLUConfig
from saeflow.sae.architectures.registry import ARCHITECTURES, build_sae
from saeflow.sae.architectures.relu import ReLUConfig
from saeflow.sae.architectures.topk import TopKConfig
from saeflow.sae.lm.sites import Site
from saeflow.storage.checkpoints import weight_shapes

WEIGHTS = "sae_weights.safetensors"  # SAELens' SAE_WEIGHTS_FILENAME
CONFIG = "cfg.json"  # SAELens' SAE_CFG_FILENAME
ACTIVATION_SCALER = "activation_scaler.json"  # SAELens' ACTIVATION_SCALER_CFG_FILENAME (training checkpoints)
SAELENS_FORMAT_VERSION = "6.54.12"
"""The SAELens release whose format this module writes; stored as metadata.sae_lens_version."""

EXPORT_ARCHITECTURE = {
    name: cls.saelens_architecture for name, cls in ARCHITECTURES.items() if cls.saelens_architecture
}
"""Registered architecture → the SAELens architecture it exports as (each SAE class says, `saelens_architecture`)."""


class SAELensFormatError(ValueError):
    """An SAE that SAELens cannot represent, or a SAELens directory saeflow cannot load faithfully."""


def hook_name_for_site(site: str) -> str:
    """TransformerLens hook name of a saeflow site: `resid_post.L` → `blocks.L.hook_resid_post` (same tensor: the
    block's output), `mlp_out.L` → `blocks.L.hook_mlp_out`. SAELens identifies an SAE's input by this name."""
    return Site.parse(site).to_hook()


# ----- export ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def saelens_state(sae: SAE) -> tuple[str, dict[str, Tensor], dict[str, Any]]:
    """(SAELens architecture, its state_dict with c folded in, architecture-specific cfg fields). Pure torch."""
    arch = sae.cfg.architecture
    target = type(sae).saelens_architecture
    if target is None:
        raise SAELensFormatError(f"cannot export a {arch!r} SAE to SAELens: {type(sae).saelens_unsupported}")
    # Fold in float64: a float64 export keeps every bit of c·W, and narrower exports round once, at the cast.
    c = float(sae.input_scale)
    p = {k: v.detach().double().cpu() for k, v in sae.named_parameters()}
    out = {"W_enc": p["W_enc"] * c, "W_dec": p["W_dec"] / c, "b_dec": p["b_dec"] / c}
    fields: dict[str, Any] = {}
    if target == "gated":
        out.update(b_gate=p["b_enc"], b_mag=p["b_mag"], r_mag=p["r_mag"])  # saeflow's b_enc is the gate bias
    else:
        out["b_enc"] = p["b_enc"]
    if isinstance(sae, BatchTopKSAE):
        # f = π·1[π > θ] equals SAELens' ReLU(π)·1[π > θ] because θ, a mean of kept (positive) values, is ≥ 0.
        out["threshold"] = torch.full((sae.d_sae,), float(sae.threshold), dtype=torch.float64)
    elif target == "jumprelu":
        out["threshold"] = p["log_threshold"].exp()
    elif target == "topk":
        # Our decoder rows are unit norm in normalized units; after folding they are 1/c, and SAELens' default
        # inference TopK (no rescaling by decoder norm) then selects on π exactly as we do.
        assert isinstance(sae.cfg, TopKConfig)  # the export table maps only the TopK family here
        fields = {"k": min(sae.cfg.k, sae.d_sae), "rescale_acts_by_decoder_norm": False}
    return target, out, fields


def export_saelens(
    sae: SAE,
    directory: str,
    hook_name: str,
    *,
    model_name: str | None = None,
    dtype: str = "float32",
    metadata: dict[str, Any] | None = None,
) -> str:
    """Write `sae` as a SAELens inference SAE (raw activations in, raw reconstruction out); returns the directory.

    hook_name: the TransformerLens hook SAELens should attach to (see `hook_name_for_site`). `metadata` adds keys
    to cfg.json's metadata (e.g. context_size, prepend_bos, dataset_path).
    """
    if dtype not in ("float32", "float64", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float64, float16 or bfloat16, not {dtype!r}")
    arch, state, fields = saelens_state(sae)
    tensors = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in state.items()}
    meta = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,  # not trained by SAELens
        "model_name": model_name,
        "hook_name": hook_name,
        "hook_head_index": None,
        # SAELens records what an inference SAE was trained as; saeflow's name and config go there too.
        "training_architecture": sae.cfg.architecture,
        "training_architecture_details": sae.cfg.model_dump(mode="json"),
        "saeflow_input_scale": float(sae.input_scale),
        "saeflow_input_scale_folded": True,
        **(metadata or {}),
    }
    cfg = {
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",  # c is folded in, as SAELens does after training
        "reshape_activations": "none",
        "metadata": meta,
        **fields,
        "architecture": arch,
    }
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS))
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump(cfg, f, indent=2)
    return directory


def export_saelens_from(source: str, dst: str, tracking_uri: str) -> str:
    """`export_saelens` of a registered SAE (NAME[@ALIAS|/VERSION], pulled to a temporary directory) or of a saeflow
    SAE directory, into the new or empty directory `dst`, with the hook name and model its cfg.json records."""
    import tempfile

    from saeflow.storage.checkpoints import load_sae, read_sae_config
    from saeflow.storage.tracking import pull

    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise ValueError(f"{dst} exists and is not an empty directory: export into a new one")
    with tempfile.TemporaryDirectory() as tmp:
        directory = source if os.path.isdir(source) else pull(source, os.path.join(tmp, "sae"), tracking_uri)
        meta = read_sae_config(directory).get("metadata") or {}
        if "site" not in meta:
            raise ValueError(f"{source} records no site, so its SAELens hook name is unknown: use export_saelens()")
        model = meta.get("model")
        return export_saelens(
            load_sae(directory),
            dst,
            hook_name_for_site(meta["site"]),
            model_name=model.get("name") if isinstance(model, dict) else model,
        )


# ----- import ------------------------------------------------------------------------------------------------------
def read_saelens_config(directory: str) -> dict[str, Any]:
    """cfg.json of a SAELens directory, with the pre-6.0 spellings SAELens itself still accepts normalised."""
    path = os.path.join(directory, CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory!r} is not a SAELens SAE directory: it has no {CONFIG}")
    with open(path) as f:
        cfg = json.load(f)
    # As handle_pre_6_0_config: no architecture means standard; `activation_fn: topk` was the old TopK.
    cfg.setdefault("architecture", "standard")
    if cfg.get("activation_fn") == "topk" and (cfg.get("activation_fn_kwargs") or {}).get("k") is not None:
        cfg["architecture"], cfg["k"] = "topk", cfg["activation_fn_kwargs"]["k"]
    elif cfg.get("activation_fn", "relu") != "relu":
        raise SAELensFormatError(f"SAELens activation_fn {cfg['activation_fn']!r} is not supported")
    norm = cfg.get("normalize_activations")
    cfg["normalize_activations"] = {None: "none", False: "none", True: "expected_average_only_in"}.get(norm, norm)
    return cfg


def _input_scale(cfg: dict[str, Any], directory: str, scaling_factor: float | None) -> float:
    norm = cfg["normalize_activations"]
    if norm == "none":
        if scaling_factor is not None:
            raise SAELensFormatError("scaling_factor given, but this SAE says normalize_activations='none'")
        return 1.0
    if norm == "expected_average_only_in":
        # The weights expect c·x, and SAELens keeps c outside cfg.json (activation_scaler.json next to a training
        # checkpoint, or norm_scaling_factor in its pretrained registry). c becomes our input_scale: same semantics.
        scaler = os.path.join(directory, ACTIVATION_SCALER)
        if scaling_factor is None and os.path.exists(scaler):
            with open(scaler) as f:
                scaling_factor = json.load(f).get("scaling_factor")
        if scaling_factor is None:
            raise SAELensFormatError(
                "this SAE expects activations multiplied by a scaling factor (normalize_activations="
                "'expected_average_only_in') that is not stored with it; pass scaling_factor=..."
            )
        if not math.isfinite(scaling_factor) or scaling_factor <= 0:
            raise SAELensFormatError(f"scaling factor must be a positive finite number, got {scaling_factor}")
        return float(scaling_factor)
    raise SAELensFormatError(
        f"normalize_activations={norm!r} is not supported: saeflow SAEs scale inputs by one constant, while "
        "constant_norm_rescale / layer_norm normalise each token and covariance_whitening needs matrices SAELens "
        "folds away before saving an inference SAE"
    )


def _is_unit_norm(W_dec: Tensor) -> bool:
    return bool(torch.allclose(W_dec.double().norm(dim=1), torch.ones(W_dec.shape[0], dtype=torch.float64), atol=1e-4))


def import_saelens(directory: str, device: str | torch.device = "cpu", scaling_factor: float | None = None) -> SAE:
    """Load a SAELens inference directory (standard, gated, jumprelu, topk) as a saeflow SAE, in eval mode.

    The module takes the same inputs the SAELens SAE takes: input_scale = 1 unless the directory says
    normalize_activations='expected_average_only_in', in which case input_scale = that factor (read from
    activation_scaler.json when present, else `scaling_factor`). apply_b_dec_to_input=False and TopK's
    rescale_acts_by_decoder_norm=True are folded into the weights so the codes stay the same. Architectures whose
    saeflow class keeps a unit-norm decoder (topk) renormalise W_dec if fine-tuned; gated/jumprelu imports keep
    a free decoder unless the rows are already unit norm.
    """
    cfg = read_saelens_config(directory)
    arch = cfg["architecture"]
    scale = _input_scale(cfg, directory, scaling_factor)
    weight_shapes(os.path.join(directory, WEIGHTS))  # a garbage or truncated file is one line, before any read
    t = {k: v.double() for k, v in load_file(os.path.join(directory, WEIGHTS)).items()}
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    if tuple(t["W_enc"].shape) != (d_in, d_sae) or tuple(t["W_dec"].shape) != (d_sae, d_in):
        raise SAELensFormatError(
            f"W_enc {tuple(t['W_enc'].shape)} / W_dec {tuple(t['W_dec'].shape)} do not match "
            f"d_in={d_in}, d_sae={d_sae} in {CONFIG}"
        )
    if cfg.get("rescale_acts_by_decoder_norm"):
        # SAELens' _fold_norm_topk: selecting on π·‖W_dec,i‖ and decoding f/‖W_dec,i‖ equals selecting on the π of
        # W_enc·‖W_dec,i‖, b_enc·‖W_dec,i‖ and decoding with unit rows.
        n = t["W_dec"].norm(dim=1)
        t["W_enc"], t["b_enc"], t["W_dec"] = t["W_enc"] * n, t["b_enc"] * n, t["W_dec"] / n[:, None]
    state = {"W_enc": t.pop("W_enc"), "W_dec": t.pop("W_dec"), "b_dec": t.pop("b_dec")}
    meta = cfg.get("metadata") or {}
    if scale == 1.0 and meta.get("saeflow_input_scale_folded") and meta.get("saeflow_input_scale"):
        # Our own export: unfold c so the SAE again works in the units it was trained in. π and x̂_raw are
        # unchanged, and normalized-unit metrics (MSE, γ, ...) match the original checkpoint's.
        scale = float(meta["saeflow_input_scale"])
        state["W_enc"], state["W_dec"], state["b_dec"] = (
            state["W_enc"] / scale,
            state["W_dec"] * scale,
            state["b_dec"] * scale,
        )
    unit = _is_unit_norm(state["W_dec"])
    if arch == "standard":
        sae_cfg: Any = ReLUConfig(d_sae=d_sae)
        state["b_enc"] = t.pop("b_enc")
    elif arch == "topk":
        sae_cfg = TopKConfig(d_sae=d_sae, k=int(cfg["k"]))
        state["b_enc"] = t.pop("b_enc")
    elif arch == "jumprelu":
        sae_cfg = JumpReLUConfig(d_sae=d_sae, unit_norm_decoder=unit)
        state["b_enc"] = t.pop("b_enc")
        if "log_threshold" in t:  # older SAELens checkpoints
            state["log_threshold"] = t.pop("log_threshold")
        else:
            # SAELens computes ReLU(π)·1[π > θ], so θ ≤ 0 acts as θ = 0; saeflow stores log θ, so clamp to the
            # smallest positive float, which differs only for π in (0, 1e-38].
            state["log_threshold"] = t.pop("threshold").clamp_min(torch.finfo(torch.float32).tiny).log()
    elif arch == "gated":
        sae_cfg = GatedConfig(d_sae=d_sae, unit_norm_decoder=unit)
        state.update(b_enc=t.pop("b_gate"), b_mag=t.pop("b_mag"), r_mag=t.pop("r_mag"))
    else:
        raise SAELensFormatError(
            f"SAELens architecture {arch!r} has no saeflow equivalent; importable: standard, gated, jumprelu, topk "
            "(BatchTopK/Matryoshka SAELens SAEs are saved for inference as jumprelu)"
        )
    if t:
        raise SAELensFormatError(f"unexpected tensors for a SAELens {arch!r} SAE: {sorted(t)}")
    if not cfg.get("apply_b_dec_to_input", True):
        # SAELens then computes π = x W_enc + b_enc; ours always centres, π = (x − b_dec) W_enc + b_enc', so
        # b_enc' = b_enc + b_dec W_enc (and the same per path for gated, whose magnitude path uses W_enc·exp(r_mag)).
        shift = state["b_dec"] @ state["W_enc"]
        state["b_enc"] = state["b_enc"] + shift
        if arch == "gated":
            state["b_mag"] = state["b_mag"] + shift * state["r_mag"].exp()
    sae = build_sae(sae_cfg, d_in)
    state["input_scale"] = torch.tensor(scale, dtype=torch.float64)
    sae.load_state_dict({k: v.float() for k, v in state.items()})
    return sae.to(device).eval()
