"""SAELens interop (storage/saelens.py): export folds the scale c in, import reads SAELens' format back faithfully.

`saelens_forward` re-implements SAELens 6.54.12's inference encode/decode (sae_lens/saes/{standard,gated,jumprelu,
topk}_sae.py) from the files alone, so the tests check the format's meaning, not just export ∘ import = id.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from saeflow.sae import build_sae
from saeflow.sae.architectures.base import SAE
from saeflow.storage.saelens import (
    EXPORT_ARCHITECTURE,
    SAELensFormatError,
    export_saelens,
    hook_name_for_site,
    import_saelens,
    read_saelens_config,
)

D_IN, D_SAE, SCALE = 32, 128, 0.137
EXPORTABLE = sorted(EXPORT_ARCHITECTURE)  # every architecture that says it exports
SAELENS_TENSORS = {
    "standard": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "topk": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "jumprelu": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
    "gated": {"W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag"},
}


def make_sae(arch: str, seed: int = 0) -> SAE:
    """A trained-looking SAE: random biases, thresholds, magnitudes, and the non-trivial input scale c = 0.137."""
    torch.manual_seed(seed)
    extra = {"k": 8} if arch in ("topk", "batchtopk", "matryoshka") else {}
    sae = build_sae({"architecture": arch, "d_sae": D_SAE, **extra}, D_IN)
    with torch.no_grad():
        sae.b_enc.normal_(std=0.3)
        sae.b_dec.normal_()
        sae.input_scale.fill_(SCALE)
        for name, p in sae.named_parameters():
            if name in ("r_mag", "b_mag"):
                p.normal_(std=0.3)
            if name == "log_threshold":
                p.copy_(torch.randn(D_SAE) * 0.5 - 1.0)
        if hasattr(sae, "threshold_updates"):
            sae.threshold.fill_(0.4)  # BatchTopK's inference θ, in normalized units
    return sae.eval()


def raw_inputs(seed: int = 1) -> torch.Tensor:
    # Raw activations live at 1/c the normalized scale, as LM activations do before normalization.
    return torch.randn(256, D_IN, generator=torch.Generator().manual_seed(seed)) * 1.5 / SCALE


def saelens_forward(directory: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(code, reconstruction) of a SAELens inference SAE, computed as SAELens 6.54.12 does."""
    cfg = read_saelens_config(directory)
    t = {k: v.double() for k, v in load_file(os.path.join(directory, "sae_weights.safetensors")).items()}
    x = x.double()
    sae_in = x - t["b_dec"] * cfg["apply_b_dec_to_input"]
    W_dec = t["W_dec"]
    if cfg["architecture"] == "gated":
        gate = (sae_in @ t["W_enc"] + t["b_gate"] > 0).double()
        f = gate * torch.relu(sae_in @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"])
    else:
        pre = sae_in @ t["W_enc"] + t["b_enc"]
        if cfg["architecture"] == "standard":
            f = torch.relu(pre)
        elif cfg["architecture"] == "jumprelu":
            f = torch.relu(pre) * (pre > t["threshold"]).double()
        else:  # topk
            rescale = cfg["rescale_acts_by_decoder_norm"]
            if rescale:
                pre = pre * W_dec.norm(dim=-1)
            vals, idx = pre.topk(cfg["k"], dim=-1)
            f = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
            if rescale:
                return f, (f / W_dec.norm(dim=-1)) @ W_dec + t["b_dec"]
    return f, f @ W_dec + t["b_dec"]


def assert_same_codes(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(a > 0, b > 0), "different latents fire"
    assert 0 < int((a > 0).sum()) < a.numel(), "degenerate test code: nothing or everything fires"
    torch.testing.assert_close(a.double(), b.double(), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", EXPORTABLE)
def test_export_then_import_gives_same_reconstruction_and_codes(arch, tmp_path):
    sae = make_sae(arch)
    back = import_saelens(export_saelens(sae, str(tmp_path / arch), hook_name="blocks.3.hook_resid_post"))
    # Our own export records the folded scale, so import unfolds it: the SAE is back in its training units.
    assert float(back.input_scale) == pytest.approx(SCALE)
    torch.testing.assert_close(back.W_dec, sae.W_dec, atol=1e-5, rtol=1e-5)
    x = raw_inputs()
    with torch.no_grad():
        torch.testing.assert_close(back.reconstruct_raw(x), sae.reconstruct_raw(x), atol=1e-4, rtol=1e-5)
        assert_same_codes(back.encode_raw(x), sae.encode_raw(x))


@pytest.mark.parametrize("arch", EXPORTABLE)
def test_exported_sae_computes_in_saelens_what_saeflow_computes_on_raw_inputs(arch, tmp_path):
    sae = make_sae(arch)
    directory = export_saelens(sae, str(tmp_path / arch), hook_name="blocks.3.hook_resid_post")
    x = raw_inputs()
    f, x_hat = saelens_forward(directory, x)
    with torch.no_grad():
        torch.testing.assert_close(x_hat.float(), sae.reconstruct_raw(x), atol=1e-4, rtol=1e-5)
        assert_same_codes(f, sae.encode_raw(x))


@pytest.mark.parametrize("arch", EXPORTABLE)
def test_exported_tensors_have_saelens_names_and_shapes(arch, tmp_path):
    directory = export_saelens(make_sae(arch), str(tmp_path / arch), hook_name="blocks.0.hook_resid_post")
    cfg = read_saelens_config(directory)
    tensors = load_file(os.path.join(directory, "sae_weights.safetensors"))
    assert set(tensors) == SAELENS_TENSORS[cfg["architecture"]]
    assert tensors["W_enc"].shape == (D_IN, D_SAE) and tensors["W_dec"].shape == (D_SAE, D_IN)
    assert tensors["b_dec"].shape == (D_IN,)
    assert all(v.shape == (D_SAE,) for k, v in tensors.items() if k not in ("W_enc", "W_dec", "b_dec"))
    assert all(v.dtype == torch.float32 for v in tensors.values())


def test_exported_cfg_has_saelens_keys_and_records_the_scale(tmp_path):
    sae = make_sae("topk")
    export_saelens(
        sae,
        str(tmp_path),
        hook_name=hook_name_for_site("resid_post.3"),
        model_name="gpt2",
        metadata={"context_size": 128},
    )
    with open(tmp_path / "cfg.json") as f:
        cfg = json.load(f)
    assert {
        "d_in",
        "d_sae",
        "dtype",
        "device",
        "apply_b_dec_to_input",
        "normalize_activations",
        "reshape_activations",
        "metadata",
        "architecture",
        "k",
        "rescale_acts_by_decoder_norm",
    } <= set(cfg)
    assert (cfg["architecture"], cfg["k"], cfg["d_in"], cfg["d_sae"]) == ("topk", 8, D_IN, D_SAE)
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    assert cfg["rescale_acts_by_decoder_norm"] is False
    meta = cfg["metadata"]
    assert meta["hook_name"] == "blocks.3.hook_resid_post" and meta["model_name"] == "gpt2"
    assert meta["context_size"] == 128 and meta["sae_lens_version"].startswith("6.")
    assert meta["saeflow_input_scale"] == pytest.approx(SCALE) and meta["saeflow_input_scale_folded"] is True
    assert meta["training_architecture"] == "topk" and meta["training_architecture_details"]["k"] == 8


def test_export_folds_the_scale_into_encoder_and_decoder(tmp_path):
    sae = make_sae("gated")
    t = load_file(os.path.join(export_saelens(sae, str(tmp_path), hook_name="h"), "sae_weights.safetensors"))
    torch.testing.assert_close(t["W_enc"], sae.W_enc.detach() * SCALE)
    torch.testing.assert_close(t["W_dec"], sae.W_dec.detach() / SCALE)
    torch.testing.assert_close(t["b_dec"], sae.b_dec.detach() / SCALE)
    torch.testing.assert_close(t["b_gate"], sae.b_enc.detach())  # biases and r_mag untouched: π is unchanged
    torch.testing.assert_close(t["r_mag"], sae.r_mag.detach())


def test_batchtopk_exports_as_jumprelu_with_its_shared_threshold(tmp_path):
    directory = export_saelens(make_sae("batchtopk"), str(tmp_path), hook_name="h")
    assert read_saelens_config(directory)["architecture"] == "jumprelu"
    assert torch.all(load_file(os.path.join(directory, "sae_weights.safetensors"))["threshold"] == 0.4)


def test_topafa_export_is_refused_with_the_reason(tmp_path):
    sae = build_sae({"architecture": "topafa", "d_sae": D_SAE}, D_IN)
    with pytest.raises(SAELensFormatError, match="top-AFA"):
        export_saelens(sae, str(tmp_path), hook_name="h")
    assert not os.path.exists(tmp_path / "cfg.json")


def _rewrite(directory: str, cfg_update: dict, tensors: dict | None = None) -> str:
    cfg = read_saelens_config(directory)
    cfg.update(cfg_update)
    with open(os.path.join(directory, "cfg.json"), "w") as f:
        json.dump(cfg, f)
    if tensors is not None:
        save_file(
            {k: v.float().contiguous() for k, v in tensors.items()}, os.path.join(directory, "sae_weights.safetensors")
        )
    return directory


def test_import_folds_apply_b_dec_to_input_false(tmp_path):
    for arch in ("relu", "gated"):
        directory = export_saelens(make_sae(arch), str(tmp_path / arch), hook_name="h")
        t = {k: v.double() for k, v in load_file(os.path.join(directory, "sae_weights.safetensors")).items()}
        shift = t["b_dec"] @ t["W_enc"]  # the same SAE, written as SAELens' π = x W_enc + b_enc'
        if arch == "gated":
            t["b_gate"], t["b_mag"] = t["b_gate"] - shift, t["b_mag"] - shift * t["r_mag"].exp()
        else:
            t["b_enc"] = t["b_enc"] - shift
        _rewrite(directory, {"apply_b_dec_to_input": False}, t)
        x = raw_inputs()
        f, x_hat = saelens_forward(directory, x)
        back = import_saelens(directory)
        with torch.no_grad():
            torch.testing.assert_close(back.reconstruct_raw(x), x_hat.float(), atol=1e-4, rtol=1e-5)
            assert_same_codes(back.encode_raw(x), f)


def test_import_folds_topk_rescale_acts_by_decoder_norm(tmp_path):
    directory = export_saelens(make_sae("topk"), str(tmp_path), hook_name="h")
    t = load_file(os.path.join(directory, "sae_weights.safetensors"))
    t["W_dec"] = t["W_dec"] * torch.linspace(0.5, 2.0, D_SAE)[:, None]  # rows of uneven norm
    _rewrite(directory, {"rescale_acts_by_decoder_norm": True}, t)
    x = raw_inputs()
    f, x_hat = saelens_forward(directory, x)
    back = import_saelens(directory)
    with torch.no_grad():
        torch.testing.assert_close(back.reconstruct_raw(x), x_hat.float(), atol=1e-4, rtol=1e-5)
        # SAELens' code is in the rescaled units (π·‖W_dec,i‖); the folded module's code is that same number.
        assert_same_codes(back.encode_raw(x), f)


def test_import_expected_average_only_in_uses_the_stored_scaling_factor(tmp_path):
    sae = make_sae("jumprelu")
    directory = export_saelens(sae, str(tmp_path), hook_name="h")
    # Unfold c again: these are the weights SAELens trains, which want c·x, with c in activation_scaler.json.
    t = load_file(os.path.join(directory, "sae_weights.safetensors"))
    t.update(W_enc=t["W_enc"] / SCALE, W_dec=t["W_dec"] * SCALE, b_dec=t["b_dec"] * SCALE)
    _rewrite(directory, {"normalize_activations": "expected_average_only_in"}, t)
    with pytest.raises(SAELensFormatError, match="scaling_factor"):
        import_saelens(directory)
    assert float(import_saelens(directory, scaling_factor=SCALE).input_scale) == pytest.approx(SCALE)
    with open(os.path.join(directory, "activation_scaler.json"), "w") as f:
        json.dump({"scaling_factor": SCALE, "has_whitening": False}, f)
    back = import_saelens(directory)
    x = raw_inputs()
    with torch.no_grad():
        torch.testing.assert_close(back.reconstruct_raw(x), sae.reconstruct_raw(x), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("norm", ["layer_norm", "constant_norm_rescale", "covariance_whitening"])
def test_import_rejects_per_token_or_whitening_normalization(norm, tmp_path):
    directory = _rewrite(
        export_saelens(make_sae("relu"), str(tmp_path), hook_name="h"), {"normalize_activations": norm}
    )
    with pytest.raises(SAELensFormatError, match=norm):
        import_saelens(directory)


def test_import_rejects_architectures_without_a_saeflow_equivalent(tmp_path):
    directory = _rewrite(
        export_saelens(make_sae("topk"), str(tmp_path), hook_name="h"), {"architecture": "matching_pursuit"}
    )
    with pytest.raises(SAELensFormatError, match="matching_pursuit"):
        import_saelens(directory)


def test_hook_name_for_site_maps_to_transformer_lens_names():
    assert hook_name_for_site("resid_post.7") == "blocks.7.hook_resid_post"
    assert hook_name_for_site("mlp_out.0") == "blocks.0.hook_mlp_out"
    with pytest.raises(ValueError):
        hook_name_for_site("resid_pre.1")
