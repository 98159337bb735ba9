"""Whether a hub model can be loaded here, asked before any work: the local hub cache, else the
hub itself with a short timeout. The libraries' own loaders retry a dead connection for minutes
instead (152 s, ~200 "Retrying" lines, then a traceback, measured without a hub)."""

from __future__ import annotations

import functools

HUB_TIMEOUT_S = 5.0  # a hub that has not answered in this long is taken as unreachable


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
