"""Names that may be Hugging Face hub ids, and one quick question to the hub before loading.

transformers and datasets retry an unreachable hub with back-off (about 25 s for a data set and
50 s for a model here, then a chain of tracebacks). One metadata request answers first whether
the repository exists and the hub can be reached, so a typo or a machine without network fails
in a second with one line. With HF_HUB_OFFLINE set nothing is asked: the loaders read their
local cache, and what fails there is converted where it is loaded.
"""

from __future__ import annotations

import functools
import re

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

from preftune.errors import UserError

# owner/name, as the hub spells repository ids (no leading '.', '/' or '~': those are paths)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
PROBE_TIMEOUT_S = 10.0


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(str(name)))


def check_hub_repo(repo_id: str, repo_type: str, error: type[UserError], key: str) -> None:
    """Raise `error` in one line unless the hub has `repo_id` ('model' or 'dataset') and can be
    reached now; `key` is the config key that named it, for the message."""
    if constants.HF_HUB_OFFLINE:
        return
    kind = "data set" if repo_type == "dataset" else "model"
    try:
        _ask(repo_id, repo_type)
    except RepositoryNotFoundError:
        raise error(
            f"{key}={repo_id}: no such local file or folder, and no {kind} of that name on the "
            f"Hugging Face hub (or it is private); check the spelling or give a local path"
        ) from None
    except GatedRepoError:
        raise error(
            f"{key}={repo_id}: the hub {kind} is gated; accept its terms on huggingface.co and "
            f"log in (hf auth login), or give a local copy"
        ) from None
    except Exception as e:  # noqa: BLE001 - any failure to reach the hub reads the same to a user
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise error(
            f"{key}={repo_id}: no such local file or folder, and the Hugging Face hub could not "
            f"be asked for it ({reason}); give a local path, or connect to the network"
        ) from None


@functools.lru_cache(maxsize=64)
def _ask(repo_id: str, repo_type: str) -> None:
    """One metadata request; a yes is remembered (a run resolves its model several times), a
    failure raises and is asked again next time."""
    HfApi().repo_info(repo_id, repo_type=repo_type, timeout=PROBE_TIMEOUT_S)
