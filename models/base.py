"""How the engine names and places models; backends are details of each model module.

A model is named by one string: a local folder, a hub id, or ``tiny`` (a random-weight model
of the real architecture, built from a config in code and saved to a local folder, then
loaded through the same code as a real checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.errors import ConfigError
from models.hub import hub_problem

TINY = "tiny"
# How messages name a role's model ("embedding model ...", "RAM++ model ...")
ROLE_NAMES = {"embed": "embedding", "ram_plus": "RAM++", "owlv2": "OWLv2", "detector": "closed-set detector"}
# Roles whose models are only ever local files, with what to give instead.
LOCAL_ONLY = {"ram_plus": "give the local ram_plus_swin_large_14m.pth (or its folder, or its ONNX export) "
                          "with ram_tag_list.txt beside it"}
# Roles named in their library's own namespace (open_clip architectures, 'hf-hub:' ids), checked
# by their module with the weights they go with (models/embedder.py check_model).
OWN_NAMES = {"embed"}


@dataclass(frozen=True)
class ModelRef:
    name: str  # local folder, hub id, or "tiny"
    role: str  # which model this is ("caption", "embed", "owlv2", ...): picks the tiny build

    @property
    def is_tiny(self) -> bool:
        return self.name == TINY

    @property
    def is_local(self) -> bool:
        return Path(self.name).expanduser().exists()

    def check(self) -> None:
        """Fail before any work starts when the model cannot be found."""
        if self.is_tiny or self.is_local:
            return
        role = ROLE_NAMES.get(self.role, self.role)
        if self.role in LOCAL_ONLY:
            raise ConfigError(f"{role} model {self.name!r} does not exist: {LOCAL_ONLY[self.role]}")
        if _looks_like_path(self.name):
            raise ConfigError(
                f"{role} model folder {self.name!r} does not exist: pass an existing "
                f"checkpoint folder, a hub id, or 'tiny'"
            )
        if self.role in OWN_NAMES:
            return
        problem = hub_problem(self.name, f"{role} model")
        if problem:
            raise ConfigError(problem)

    def resolve(self, cache_dir: Path) -> str:
        """The path or hub id to hand to the library's own loader."""
        if self.is_tiny:
            from models import tiny

            return str(tiny.ensure(self.role, cache_dir / "tiny"))
        if self.is_local:
            return str(Path(self.name).expanduser())
        return self.name


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1


def resolve_device(device: str) -> str:
    """``auto`` → the first GPU when there is one, else ``cpu``; a GPU asked for must exist."""
    if device == "cpu":
        return device
    import torch

    has_cuda = torch.cuda.is_available()
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    if device.startswith("cuda"):
        if not has_cuda:
            raise ConfigError(
                f"--device {device} asked for a GPU but torch sees none: run on a GPU node "
                f"or pass --device cpu"
            )
        return device
    raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
