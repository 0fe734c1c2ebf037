"""The model side: name activation sites, find them in HF transformers models, capture and splice them.

A site is `<kind>.<layer>`:
- `resid_post.L` — the residual stream after block L (the block's output hidden state);
- `mlp_out.L` — the output of block L's MLP, before it is added to the residual stream.
Blocks are found for GPT-2, GPT-NeoX/Pythia, Llama/Gemma/Mistral/Qwen-style and BERT-style models.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

# Attribute paths of the block list, most specific first.
_BLOCK_PATHS = (
    "transformer.h",  # GPT-2, GPT-J, Bloom
    "gpt_neox.layers",  # GPT-NeoX / Pythia
    "model.layers",  # Llama, Gemma, Mistral, Qwen
    "model.language_model.layers",  # multimodal wrappers (Gemma 3)
    "layers",  # bare decoder models (LlamaModel)
    "h",  # bare GPT2Model
    "bert.encoder.layer",
    "encoder.layer",  # BertModel, RobertaModel
    "roberta.encoder.layer",
)
# MLP submodule of a block, by attribute path; the first that exists wins.
_MLP_PATHS = ("mlp", "feed_forward", "output.dense")


class SiteError(ValueError):
    """A site name that is malformed or does not exist in the model."""


def _block_output(block: nn.Module) -> nn.Module:
    return block


def _block_mlp(block: nn.Module) -> nn.Module:
    for path in _MLP_PATHS:
        mod = _get_path(block, path)
        if mod is not None:
            return mod
    raise SiteError(f"block {type(block).__name__} has none of the MLP submodules {_MLP_PATHS}")


@dataclass(frozen=True)
class SiteKind:
    """One kind of site: where its module is inside a block, its TransformerLens hook, its order in the block."""

    module: Callable[[nn.Module], nn.Module]
    """Block → the module whose output *is* the site's activation."""
    hook: str
    """TransformerLens hook suffix (`blocks.L.<hook>`), the name SAELens records an SAE's input by."""
    order: int
    """Position of the activation within a block's forward pass (a capture stops after the last one)."""


SITE_KINDS: dict[str, SiteKind] = {
    "mlp_out": SiteKind(_block_mlp, "hook_mlp_out", 0),
    "resid_post": SiteKind(_block_output, "hook_resid_post", 1),
}
"""The site kinds, by name. Adding one is adding a row here (and a case to tests/test_sites.py)."""
_SITE_RE = re.compile(r"^(\w+)\.(\d+)$")
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(hook_\w+)$")


@dataclass(frozen=True, order=True)
class Site:
    """An activation site, `<kind>.<layer>`: e.g. `resid_post.6` (block 6's output) or `mlp_out.3`.

    Sites sort in forward-pass order (layer, then the kind's order within the block)."""

    layer: int
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise SiteError(f"unknown site kind {self.kind!r}: choose one of {sorted(SITE_KINDS)}")

    def __str__(self) -> str:
        return f"{self.kind}.{self.layer}"

    @property
    def depth(self) -> tuple[int, int]:
        return (self.layer, SITE_KINDS[self.kind].order)

    @classmethod
    def parse(cls, name: str) -> Site:
        m = _SITE_RE.match(name.strip())
        if not m or m.group(1) not in SITE_KINDS:
            raise SiteError(
                f"bad site {name!r}: write '<kind>.<layer>' with kind in {tuple(SITE_KINDS)}, e.g. 'resid_post.6' "
                "or 'mlp_out.3'"
            )
        return cls(int(m.group(2)), m.group(1))

    def to_hook(self) -> str:
        """TransformerLens hook name: `resid_post.L` → `blocks.L.hook_resid_post` (same tensor: the block's output),
        `mlp_out.L` → `blocks.L.hook_mlp_out`."""
        return f"blocks.{self.layer}.{SITE_KINDS[self.kind].hook}"

    @classmethod
    def from_hook(cls, hook_name: str | None) -> Site | None:
        """The site a TransformerLens hook reads, or None if saeflow has no such site. `blocks.L.hook_resid_pre` is
        `resid_post.(L−1)` (the same tensor); block 0's input is no site."""
        m = _HOOK_RE.match(hook_name or "")
        if not m:
            return None
        layer, hook = int(m.group(1)), m.group(2)
        if hook == "hook_resid_pre":
            return cls(layer - 1, "resid_post") if layer > 0 else None
        kind = next((k for k, v in SITE_KINDS.items() if v.hook == hook), None)
        return cls(layer, kind) if kind else None


def parse_site(name: str) -> Site:
    return Site.parse(name)


def _get_path(module: nn.Module, path: str) -> nn.Module | None:
    obj: Any = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_blocks(model: nn.Module) -> nn.ModuleList:
    for path in _BLOCK_PATHS:
        blocks = _get_path(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, mod in model.named_modules():  # unknown layout: the first ModuleList as long as the layer count
        if isinstance(mod, nn.ModuleList) and n and len(mod) == n:
            return mod
    raise SiteError(f"cannot find the transformer blocks of {type(model).__name__}; saeflow knows {_BLOCK_PATHS}")


def site_module(model: nn.Module, site: Site | str) -> nn.Module:
    """The module whose output *is* the site's activation."""
    site = parse_site(site) if isinstance(site, str) else site
    blocks = find_blocks(model)
    if not 0 <= site.layer < len(blocks):
        raise SiteError(
            f"site {site} does not exist: {type(model).__name__} has {len(blocks)} blocks, layers 0..{len(blocks) - 1}"
        )
    try:
        return SITE_KINDS[site.kind].module(blocks[site.layer])
    except SiteError as e:
        raise SiteError(f"site {site}: {e}") from None


def _hidden(output) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, new: Tensor):
    return (new, *output[1:]) if isinstance(output, tuple) else new


class _StopForward(Exception):
    pass


@contextlib.contextmanager
def capture_sites(model: nn.Module, sites: list[str], stop_early: bool = True) -> Iterator[dict[str, Tensor]]:
    """Record each site's activation [batch, seq, d] into the yielded dict during forward passes.

    With stop_early, the forward pass is cut after the deepest site — call `run_to_sites` for that.
    """
    captured: dict[str, Tensor] = {}
    parsed = [parse_site(s) for s in sites]
    deepest = max(parsed, key=lambda s: s.depth)
    handles = []

    def hook_for(name: str, last: bool):
        def hook(_mod, _inp, out):
            captured[name] = _hidden(out).detach()
            if last and stop_early:
                raise _StopForward

        return hook

    try:
        for s in parsed:
            handles.append(site_module(model, s).register_forward_hook(hook_for(str(s), s == deepest)))
        yield captured
    finally:
        for h in handles:
            h.remove()


def run_to_sites(model: nn.Module, input_ids: Tensor, sites: list[str], **kwargs) -> dict[str, Tensor]:
    """Run the model only as deep as the deepest site and return {site: activation [B, T, d]}."""
    with capture_sites(model, sites, stop_early=True) as captured, contextlib.suppress(_StopForward):
        model(input_ids=input_ids, **kwargs)
    return dict(captured)


@contextlib.contextmanager
def splice_site(model: nn.Module, site: str, replace: Callable[[Tensor], Tensor], skip_first: int = 1):
    """Replace the site's activation by `replace(activation)` at every position from `skip_first` on.

    Position 0 (BOS) is left alone (MATH §5). `replace` maps [B, T', d] to [B, T', d] in the model's units.
    """

    def hook(_mod, _inp, out):
        h = _hidden(out)
        new = h.clone()
        new[:, skip_first:] = replace(h[:, skip_first:]).to(h.dtype)
        return _replace_hidden(out, new)

    handle = site_module(model, site).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def site_width(model: nn.Module, site: str) -> int:
    """d of the site's activation: hidden size for residual sites and for MLP outputs alike."""
    cfg: Any = model.config
    return int(getattr(cfg, "hidden_size", None) or cfg.n_embd)
