"""How the engine names and places models; backends are details of each model module.

A model is named by one string: a local folder, a hub id, or ``tiny`` (a random-weight model
of the real architecture, built from a config in code and saved to a local folder, then
loaded through the same code as a real checkpoint).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from engine.core.errors import ConfigError

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


# A hub that has not answered in this long is taken as unreachable: the libraries' own loaders
# retry a dead connection for minutes (152 s, ~200 "Retrying" lines, then a traceback, measured).
HUB_TIMEOUT_S = 5.0


def hub_problem(repo_id: str, what: str, files: tuple[str, ...] = ("config.json",),
                instead: str = "pass a local folder") -> str | None:
    """Why the hub model ``repo_id`` cannot be loaded here (a sentence that says what to do), or
    None: any of ``files`` is in the local hub cache, or the hub says the repository exists.
    Offline (``HF_HUB_OFFLINE``) or with the hub unreachable, this takes seconds, not minutes."""
    from huggingface_hub import constants, is_offline_mode, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        if any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in files):
            return None
    except HFValidationError as exc:
        return f"{what} {repo_id!r} is neither a local path nor a hub id: {exc}"
    fetch = (f"download it where the hub is reachable (`hf download {repo_id}`, into {constants.HF_HUB_CACHE}) "
             f"or {instead}")
    if is_offline_mode():
        return f"{what} {repo_id!r} is not in the local hub cache and HF_HUB_OFFLINE is set: {fetch}"
    answer = _hub_answer(constants.ENDPOINT, repo_id)
    return f"{what} {repo_id!r}: {answer}" + ("" if answer.startswith("no such") else f": {fetch}") if answer else None


_unreachable: dict[str, str] = {}  # endpoint -> why: asked once per process, not once per model


@functools.lru_cache(maxsize=64)
def _hub_answer(endpoint: str, repo_id: str) -> str:
    """'' when the hub has ``repo_id``, else what it (or the network) said."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if endpoint in _unreachable:
        return _unreachable[endpoint]
    try:
        HfApi(endpoint=endpoint).model_info(repo_id, timeout=HUB_TIMEOUT_S)
        return ""
    except GatedRepoError:
        return "is gated on the hub: accept its terms there and set HF_TOKEN"
    except RepositoryNotFoundError:
        return f"no such model on the hub ({endpoint}; a private one needs HF_TOKEN)"
    except HfHubHTTPError as exc:
        return f"the hub ({endpoint}) answered {exc}"
    except Exception as exc:  # noqa: BLE001 - connection refused, timeouts, DNS: the network's, not ours
        _unreachable[endpoint] = f"not in the local hub cache and the hub ({endpoint}) cannot be reached " \
                                 f"({type(exc).__name__}: {exc})"
        return _unreachable[endpoint]


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
