"""Model I/O: one front door to load a CLIP, one to save it.

References ``load_model`` understands (S3 prefixes are fetched to a folder by ``tasks.storage``
first, so this library never touches the network):

- ``"TinyCLIP-RN32"``: an open_clip config name, randomly initialised (our tiny configs included);
- ``"ViT-B-32:openai"`` or ``"RN50:openai"``: open_clip name + pretrained tag;
- ``"local-dir:/path"`` or a plain folder path: open_clip's own layout, ``open_clip_config.json``
  plus ``open_clip_model.safetensors``. That is also what :func:`save_model` writes, so a saved
  model loads with plain ``open_clip.create_model_and_transforms('local-dir:<folder>')``.

Weights are only ever read from safetensors: a model file is never unpickled.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from open_clip.transformer import text_global_pool
from safetensors.torch import load_file, save_file

CONFIG_DIR = Path(__file__).parent / "model_configs"
DEFAULT_MODEL = "TinyCLIP-RN32"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
LOCAL_DIR = "local-dir:"

_registered = False


def register_tiny_configs() -> list[str]:
    """Make our tiny architectures known to open_clip by name (architectures are data)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


@dataclass
class ClipBundle:
    """A CLIP model with what it needs to be used and saved again."""

    model: torch.nn.Module
    tokenizer: object
    model_cfg: dict
    preprocess_cfg: dict = field(default_factory=dict)
    source: str = ""

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)

    def copy(self) -> "ClipBundle":
        """A deep copy of the model (e.g. the frozen original) sharing the tokenizer."""
        return ClipBundle(copy.deepcopy(self.model), self.tokenizer, copy.deepcopy(self.model_cfg),
                          dict(self.preprocess_cfg), self.source)

    def to(self, device: str | torch.device) -> "ClipBundle":
        self.model.to(device)
        return self


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given, else CUDA when present, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _folder_of(ref: str) -> Path | None:
    if ref.startswith(LOCAL_DIR):
        return Path(ref[len(LOCAL_DIR):])
    path = Path(ref)
    return path if path.is_dir() else None


def create_model(name: str, pretrained: str | None = None, device: str | torch.device = "cpu", seed: int | None = None) -> ClipBundle:
    """A model from an open_clip config name (and optional pretrained tag).

    ``seed`` makes the random initialisation reproducible (open_clip draws it from the global torch
    generator, which is forked so the caller's random state is left as it was)."""
    register_tiny_configs()
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ValueError(f"unknown model {name!r}: use an open_clip name (e.g. ViT-B-32), one of "
                         f"{register_tiny_configs()}, or a folder 'local-dir:/path'")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    model.eval()
    return ClipBundle(model, open_clip.get_tokenizer(name), model_cfg, _preprocess_cfg(model), source=f"{name}:{pretrained or 'random'}")


def load_model(ref: str = DEFAULT_MODEL, device: str | torch.device | None = None, seed: int | None = None) -> ClipBundle:
    """Load a CLIP from a name, ``name:pretrained`` or a ``local-dir:`` folder (see module doc).

    ``seed`` seeds the random initialisation of a model created from a config name (no effect on
    loaded weights)."""
    device = pick_device(str(device) if device is not None else None)
    folder = _folder_of(ref)
    if folder is None:
        name, _, tag = ref.partition(":")
        return create_model(name, tag or None, device, seed)

    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a model folder: it lacks {CONFIG_FILE} (save one with save_model)")
    if not weights_path.is_file():
        raise FileNotFoundError(f"{folder} lacks {WEIGHTS_FILE}; clip-erasure reads weights from safetensors only, never pickles")
    config = json.loads(config_path.read_text())
    model_cfg = config.get("model_cfg", config)
    model = open_clip.create_model(LOCAL_DIR + str(folder), load_weights=False, device="cpu")
    model.load_state_dict(load_file(weights_path), strict=True)
    model.to(device).eval()
    return ClipBundle(model, open_clip.get_tokenizer(LOCAL_DIR + str(folder)), model_cfg,
                      config.get("preprocess_cfg") or _preprocess_cfg(model), source=str(folder))


def _preprocess_cfg(model: torch.nn.Module) -> dict:
    visual = model.visual
    size = visual.image_size
    return {
        "size": list(size) if isinstance(size, (tuple, list)) else size,
        "mean": list(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN),
        "std": list(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def save_model(bundle: ClipBundle, folder: str | Path) -> Path:
    """Save in open_clip's folder layout: config JSON + safetensors weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": bundle.model_cfg, "preprocess_cfg": bundle.preprocess_cfg or _preprocess_cfg(bundle.model)}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    state = {k: v.detach().cpu().contiguous() for k, v in bundle.model.state_dict().items()}
    save_file(state, folder / WEIGHTS_FILE)
    return folder


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the weights, for rollback and souping."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def trim_padding(tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """``tokens`` without the trailing columns that are padding in every row."""
    used = (tokens != pad_id).any(dim=0).nonzero()
    return tokens[:, : int(used.max()) + 1] if len(used) else tokens[:, :1]


def encode_text(model: torch.nn.Module, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """``model.encode_text`` over tokens trimmed to the batch's longest text.

    open_clip always runs the full context (32 tokens for our tiny CLIPs; our captions need ~10),
    which made the text tower most of a training step. With a causal mask and end-of-text pooling,
    padding after a text's end cannot reach it, so the trimmed pass computes the same features.
    Other towers (bidirectional masks, "last" pooling, custom text models) run untrimmed."""
    pool = getattr(model, "text_pool_type", None)
    if not isinstance(model, open_clip.CLIP) or getattr(model, "attn_mask", None) is None or pool not in ("argmax", "eos"):
        return model.encode_text(tokens, normalize=normalize)
    tokens = trim_padding(tokens)
    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, pool, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
    return torch.nn.functional.normalize(x, dim=-1) if normalize else x


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


logging.getLogger("root").setLevel(logging.ERROR)  # open_clip warns "no pretrained weights" for every tiny model
