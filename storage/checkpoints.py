"""SAE checkpoints on disk: `sae_weights.safetensors` + `cfg.json` (never pickle), and resumable training states.

A training state (MATH §3.4) is a directory `state-<n>/` under a checkpoint directory holding `state.safetensors`
(every tensor: weights, Adam moments, dead counters, RNG, carried rows) and `state.json` (the structure around them,
with `{"__tensor__": key}` where a tensor was). It is written under a `.tmp-` name and renamed into place, so a run
killed while saving leaves the previous state the newest complete one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from saeflow.sae.architectures.base import SAE
from saeflow.sae.architectures.registry import build_sae, config_from_dict

if TYPE_CHECKING:
    from saeflow.sae.training import SAETrainer

WEIGHTS = "sae_weights.safetensors"
CONFIG = "cfg.json"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
STATE_FORMAT = "saeflow.training_state/1"
_STATE_DIR = re.compile(r"state-(\d+)")


def give_normal_modes(directory: str) -> None:
    """Every file under `directory` gets the mode a new file gets here (0666 minus the umask, 0644 usually).

    The one policy for SAE files saeflow writes or pulls: safetensors writes weights 0600, MLflow copies keep
    whatever the source had, and a pulled SAE should be as readable as its cfg.json."""
    umask = os.umask(0)
    os.umask(umask)
    for dirpath, _, names in os.walk(directory):
        for name in names:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~umask)


def save_sae(sae: SAE, directory: str, metadata: dict[str, Any] | None = None) -> str:
    """Write weights and config (architecture, d_in, hyperparameters, plus `metadata` such as site and model)."""
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    save_file(tensors, os.path.join(directory, WEIGHTS))
    cfg = {"d_in": sae.d_in, "d_sae": sae.d_sae, "sae": sae.cfg.model_dump(), "metadata": metadata or {}}
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump(cfg, f, indent=2, default=str)
    give_normal_modes(directory)
    return directory


def checkpoint_dir(directory: str) -> str:
    """The weights + cfg.json directory of a saved SAE: an MLflow model directory (a pulled registered SAE) keeps
    it as its `artifacts/sae`; a plain checkpoint (and versions registered before SAEs were MLflow models) is it."""
    inner = os.path.join(directory, "artifacts", "sae")
    return inner if os.path.exists(os.path.join(directory, "MLmodel")) and os.path.isdir(inner) else directory


def read_sae_config(directory: str) -> dict[str, Any]:
    directory = checkpoint_dir(directory)
    path = os.path.join(directory, CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory!r} is not a saeflow SAE checkpoint: it has no {CONFIG}")
    with open(path) as f:
        return json.load(f)


class CheckpointError(ValueError):
    """A checkpoint whose files are unreadable or do not belong together; str() is one line naming the fix."""


def weight_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape from a safetensors file's header, reading no tensor data."""
    try:
        with safe_open(path, "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118  (safe_open is no dict)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}): save or pull the SAE again") from None


def load_sae(directory: str, device: str | torch.device = "cpu") -> SAE:
    """Rebuild the SAE module saved by `save_sae` (or pulled from the registry) and load its weights.

    The shapes cfg.json declares are checked against the weights' safetensors header before anything is built."""
    directory = checkpoint_dir(directory)
    cfg = read_sae_config(directory)
    spec, d_in = config_from_dict(cfg["sae"]), int(cfg["d_in"])
    have = weight_shapes(os.path.join(directory, WEIGHTS))
    want = {"W_enc": (d_in, spec.n_latents(d_in)), "W_dec": (spec.n_latents(d_in), d_in)}
    if any(have.get(k) != v for k, v in want.items()):
        raise CheckpointError(
            f"{directory}: {CONFIG} declares d_in {d_in}, d_sae {want['W_enc'][1]} but {WEIGHTS} holds W_enc "
            f"{have.get('W_enc')}, W_dec {have.get('W_dec')}: the files do not belong together; save or pull it again"
        )
    sae = build_sae(spec, d_in)
    sae.load_state_dict(load_file(os.path.join(directory, WEIGHTS), device=str(device)))
    return sae.to(device).eval()


# ----- resumable training states (MATH §3.4) --------------------------------------------------------------------
class GroupRecord(BaseModel):
    """What a training group's state records beside the tensors (JSON in state.json)."""

    model_config = ConfigDict(frozen=True)

    identity: dict[str, Any]
    """What the state belongs to (group key, training settings, token budget, scale): resumed only when equal."""
    runs: list[str]
    """The group's MLflow run ids, one per SAE, in spec order."""
    history: list[list[dict[str, float]]]
    """Per SAE, every logged step's metrics with its `tokens` count (replayed into new runs if the old are gone)."""


class TrainingCheckpoint(NamedTuple):
    """A training state read back from disk."""

    path: str
    state: dict[str, Any]
    """`SAETrainer.state_dict()` as saved (tensors on CPU)."""
    cursor: dict[str, Any]
    """Position of the batch stream after the last step taken."""
    record: GroupRecord

    @property
    def tokens_seen(self) -> int:
        return int(self.state["tokens_seen"])


def _encode(obj: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """JSON skeleton of a tree of dicts/lists/tuples/scalars, moving each tensor into `tensors` under its path."""
    if isinstance(obj, np.ndarray):
        obj = torch.from_numpy(obj)
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{key}/{k}") for k, v in obj.items()}
        return {"__items__": [[k, _encode(v, tensors, f"{key}/{k}")] for k, v in obj.items()]}  # e.g. int keys
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, np.integer | np.floating | np.bool_):
        return obj.item()
    raise TypeError(f"cannot store a {type(obj).__name__} at {key} in a training state")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if "__tuple__" in node:
        return tuple(_decode(v, tensors) for v in node["__tuple__"])
    if "__items__" in node:
        return {k: _decode(v, tensors) for k, v in node["__items__"]}
    return {k: _decode(v, tensors) for k, v in node.items()}


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _state_dirs(directory: str) -> list[tuple[int, str]]:
    """(sequence number, name) of the complete states under `directory`, newest first."""
    if not os.path.isdir(directory):
        return []
    found = [(int(m[1]), n) for n in os.listdir(directory) if (m := _STATE_DIR.fullmatch(n))]
    return sorted(found, reverse=True)


def save_training_state(
    directory: str, trainer: SAETrainer, cursor: dict[str, Any], record: GroupRecord | None = None
) -> str:
    """Write the trainer's state, the batch cursor and `record` (default: empty) as the newest state under
    `directory`.

    Atomic: everything is written to a `.tmp-` directory first and renamed into place; older states and leftover
    temporary directories are removed only after that. Returns the new state's path.
    """
    os.makedirs(directory, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tree = {
        "format": STATE_FORMAT,
        "tokens_seen": trainer.tokens_seen,
        "trainer": _encode(trainer.state_dict(), tensors, "trainer"),
        "cursor": _encode(cursor, tensors, "cursor"),
        "extra": (record or GroupRecord(identity={}, runs=[], history=[])).model_dump(mode="json"),
    }
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=directory)
    save_file(tensors, os.path.join(tmp, STATE_TENSORS))
    with open(os.path.join(tmp, STATE_JSON), "w") as f:
        json.dump(tree, f, default=str)
    for name in (STATE_TENSORS, STATE_JSON):
        _fsync(os.path.join(tmp, name))
    newest = _state_dirs(directory)
    name = f"state-{(newest[0][0] + 1) if newest else 0:06d}"
    os.rename(tmp, os.path.join(directory, name))
    _fsync(directory)
    for other in os.listdir(directory):
        if other != name and (other.startswith(".tmp-") or _STATE_DIR.fullmatch(other)):
            shutil.rmtree(os.path.join(directory, other), ignore_errors=True)
    return os.path.join(directory, name)


def load_training_state(directory: str) -> TrainingCheckpoint | None:
    """The newest complete, readable training state under `directory`, or None.

    `.tmp-` directories (a save that was killed) and states whose files cannot be read are skipped.
    """
    for _, name in _state_dirs(directory):
        path = os.path.join(directory, name)
        try:
            with open(os.path.join(path, STATE_JSON)) as f:
                tree = json.load(f)
            if tree.get("format") != STATE_FORMAT:
                continue
            tensors = load_file(os.path.join(path, STATE_TENSORS))
            record = GroupRecord.model_validate(tree["extra"])
            return TrainingCheckpoint(path, _decode(tree["trainer"], tensors), _decode(tree["cursor"], tensors), record)
        except (
            OSError,
            ValueError,
            KeyError,
            TypeError,
            SafetensorError,
        ):  # pydantic's ValidationError is a ValueError
            continue
    return None


def load_resumable_state(directory: str, identity: dict[str, Any]) -> tuple[TrainingCheckpoint | None, str | None]:
    """(the newest state under `directory` if it belongs to `identity`, else None; why a state found was ignored)."""
    ckpt = load_training_state(directory)
    if ckpt is not None and ckpt.record.identity != identity:
        return None, f"ignoring {ckpt.path}: it was saved with a different training config"
    return ckpt, None


def clear_training_state(directory: str) -> None:
    """Remove a group's training-state checkpoints once its SAEs are safely registered."""
    shutil.rmtree(directory, ignore_errors=True)
