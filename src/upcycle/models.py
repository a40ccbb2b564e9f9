"""Models by name: every command that takes a model takes a local folder, a bundled name, or a
Hugging Face hub id, and turns it into a folder here, once.

    /models/Llama-3-8B            a local Hugging Face folder (always wins when it exists)
    bundled:smollm2               a model shipped with upcycle (`upcycle models` lists them)
    meta-llama/Meta-Llama-3-8B    a hub id, optionally @revision (a branch, tag or commit)

A hub id is resolved through huggingface_hub's cache exactly as `from_pretrained` resolves it:
online, the revision is looked up and missing files are fetched (weights as safetensors, configs
and tokenizer files only); with HF_HUB_OFFLINE=1, or without a network, the cached snapshot is
used; a model in neither gets one line saying how to fetch it. The resolved folder and the commit
go into the stage manifests and the model card (by name and commit, never by local path).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from upcycle.errors import UpcycleError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
# What a model needs from its hub repository (never pickle weights, never code).
MODEL_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja", "README.md"]
COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class ModelRef:
    """A model as the user named it and the folder it resolved to."""

    name: str                  # as given: a path, bundled:NAME, or org/name[@revision]
    path: Path                 # the local folder
    source: str                # local | bundled | hub
    repo: str | None = None    # hub: org/name
    revision: str | None = None  # hub: the commit the folder holds

    def record(self) -> dict:
        """What a manifest or card keeps of it: the name and commit for hub models, never a cache path."""
        return {"name": self.name, "source": self.source, **({"repo": self.repo, "revision": self.revision}
                                                               if self.source == "hub" else {})}


def model_ref(name: str | Path, what: str = "model") -> ModelRef:
    """Resolve a model name (see the module docstring); errors name `what` (base, experts[1], ...)."""
    from upcycle.bundled import ALIASES

    text = str(name)
    if text.startswith("bundled:"):
        if text not in ALIASES:
            raise UpcycleError(f"{what} {text}: unknown bundled model; choose one of {', '.join(ALIASES)} "
                               "(`upcycle models` lists them)")
        return ModelRef(text, ALIASES[text](), "bundled")
    path = Path(text).expanduser()
    hub = HUB_ID.match(text)
    if path.exists() or hub is None:
        return ModelRef(text, path, "local")
    return _from_hub(text, hub.group("repo"), hub.group("revision"), what)


def resolve_model(name: str | Path, what: str = "model") -> Path:
    """The local folder a model name stands for."""
    return model_ref(name, what).path


def hub_repo_of(path: Path) -> tuple[str, str] | None:
    """(org/name, commit) when `path` is a snapshot folder in the Hugging Face cache, else None."""
    parts = Path(path).resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/"), parts[-1]
    return None


def _from_hub(name: str, repo: str, revision: str | None, what: str) -> ModelRef:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    fetch = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
    where = constants.HF_HUB_CACHE
    try:
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=MODEL_FILES))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        offline = "offline mode (HF_HUB_OFFLINE) is on" if constants.HF_HUB_OFFLINE else "the hub could not be reached"
        raise UpcycleError(f"{what} {name}: not a local folder, and not in the Hugging Face cache ({where}) while "
                           f"{offline}; fetch it with `{fetch}` where there is a network, or give a local folder "
                           f"({type(e).__name__})") from None
    except HfHubHTTPError as e:
        raise UpcycleError(f"{what} {name}: the hub refused it ({str(e).splitlines()[0]}); check the id and your access "
                           f"(`hf auth login` for gated models), or give a local folder") from None
    except ValueError as e:  # an ill-formed repo id or revision
        raise UpcycleError(f"{what} {name}: not a hub model id ({e}); give a local folder or org/name[@revision]") from None
    if not any((folder / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise UpcycleError(f"{what} {name}: the cached snapshot {folder} has no config.json (nor a peft "
                           f"adapter_config.json); fetch it again with `{fetch}`")
    commit = folder.name if COMMIT.match(folder.name) else revision
    return ModelRef(name, folder, "hub", repo, commit)


def list_models() -> list[tuple[str, str]]:
    """(name, what it is) for every bundled model and every model in the Hugging Face cache."""
    from upcycle.bundled import DESCRIPTIONS

    rows = [(name, text) for name, text in DESCRIPTIONS.items()]
    try:
        from huggingface_hub import scan_cache_dir

        cache = scan_cache_dir()
    except Exception:  # noqa: BLE001 - no cache folder yet, or an unreadable one: nothing cached to list
        return rows
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        revisions = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
        commits = ", ".join(f"{r.commit_hash[:12]}" + (f" ({', '.join(sorted(r.refs))})" if r.refs else "")
                            for r in revisions)
        rows.append((repo.repo_id, f"in the Hugging Face cache, {repo.size_on_disk / 1e9:.2f} GB; commits {commits}"))
    return rows
