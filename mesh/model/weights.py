"""Reading Hugging Face safetensors checkpoints (single file or sharded with an index).

Tensors are opened lazily per file, so an expert worker reads only its own experts' bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from mesh.config import ConfigError


class WeightError(ConfigError):
    """A tensor is missing from the checkpoint or has the wrong shape."""


class CheckpointReader:
    """Name -> tensor over all `*.safetensors` files of a model directory."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._where = {name: self.model_dir / fname for name, fname in weight_map.items()}
            missing = {p for p in self._where.values() if not p.is_file()}
            if missing:
                raise WeightError(f"{index} names shard files that do not exist: {sorted(map(str, missing))}")
        else:
            files = sorted(self.model_dir.glob("*.safetensors"))
            if not files:
                raise WeightError(f"no *.safetensors files in {self.model_dir}")
            self._where = {}
            for path in files:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        self._where[name] = path
        self._handles: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str, shape: tuple[int, ...] | None = None,
            dtype: torch.dtype | None = None) -> torch.Tensor:
        path = self._where.get(name)
        if path is None:
            raise WeightError(f"tensor {name!r} is missing from the checkpoint in {self.model_dir}")
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = safe_open(str(path), framework="pt")
        tensor = handle.get_tensor(name)
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise WeightError(
                f"tensor {name!r} has shape {tuple(tensor.shape)} but config.json implies {tuple(shape)}")
        return tensor if dtype is None else tensor.to(dtype)

    def close(self) -> None:
        self._handles.clear()


class DummyReader:
    """Random tensors of the shapes asked for, made directly on the device (`load_format="dummy"`):
    norm weights are ones, everything else normal with std 0.02 (transformers' initialiser), from
    one seeded generator so two loads of the same config give the same weights."""

    def __init__(self, device: str | torch.device = "cpu", seed: int = 0, std: float = 0.02):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.std = std
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def __contains__(self, name: str) -> bool:
        # A model that ties its embeddings shares one tensor for both; nothing else is ever absent.
        return name != "lm_head.weight"

    def get(self, name: str, shape: tuple[int, ...] | None = None,
            dtype: torch.dtype | None = None) -> torch.Tensor:
        if shape is None:
            raise WeightError(f"a dummy tensor needs a shape ({name!r})")
        out = torch.empty(shape, dtype=dtype or torch.float32, device=self.device)
        if name.endswith("norm.weight"):
            return out.fill_(1.0)
        return out.normal_(0.0, self.std, generator=self.generator)

    def close(self) -> None:
        pass
