"""Artifacts every replica can load: unlearning adapters and SAEs named by URI, pinned by checksum.

A URI is a folder path (on storage every replica mounts, when there are several hosts) or a
Hugging Face Hub repo, ``hf://org/name`` with an optional ``@revision``. Registration records
the folder's digest; each replica resolves the URI to a folder of its own (:func:`fetch`:
the path itself, or the Hub's local cache, downloading when allowed) and checks the digest
(:func:`verify`) before it loads anything. So no replica serves an artifact other than the
one registered: a file changed after registration, a tag moved on the Hub, or a folder still
being copied is refused with the reason.

>>> fetch("hf://my-org/unlearn-npo@3f1c2a9")            # doctest: +SKIP
PosixPath('/root/.cache/huggingface/hub/models--my-org--unlearn-npo/snapshots/3f1c2a9...')
>>> digest("/shared/adapters/unlearn-npo/v1")           # doctest: +SKIP
'sha256:9f2c...'
"""

from __future__ import annotations

import hashlib
from pathlib import Path

HF_SCHEME = "hf://"


class ArtifactError(ValueError):
    """An artifact that cannot be fetched, or that is not the one registered; the message says which."""


def is_hub_uri(uri: str) -> bool:
    return str(uri).startswith(HF_SCHEME)


def _hub_parts(uri: str) -> tuple[str, str | None]:
    from guardserve.hub import is_repo_id

    spec = uri[len(HF_SCHEME):]
    repo, _, revision = spec.partition("@")
    if not is_repo_id(repo):
        raise ArtifactError(f"{uri}: expected hf://org/name or hf://org/name@revision")
    return repo, revision or None


def fetch(uri: str | Path) -> Path:
    """The local folder holding the artifact at ``uri``. Raises ArtifactError when there is none."""
    uri = str(uri)
    if is_hub_uri(uri):
        repo, revision = _hub_parts(uri)
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(repo, revision=revision))
        except Exception as e:  # offline without a cached copy, unknown repo or revision, no access
            raise ArtifactError(f"{uri}: not available from the Hugging Face Hub or its local cache "
                                f"({type(e).__name__}: {e})") from None
    path = Path(uri).expanduser()
    if not path.is_dir():
        raise ArtifactError(f"{uri}: no such folder on this host (replicas on several hosts need it on storage "
                            "they all mount, or an hf:// URI)")
    return path


def pin(uri: str) -> tuple[Path, str]:
    """Fetch ``uri`` and name the exact version fetched: a Hub URI gains the commit it resolved
    to (a branch or tag may move later; the commit does not). Local paths come back unchanged."""
    folder = fetch(uri)
    if is_hub_uri(uri):
        repo, _ = _hub_parts(uri)
        return folder, f"{HF_SCHEME}{repo}@{folder.name}"  # snapshots/<commit>
    return folder, str(folder.resolve())


def digest(folder: str | Path) -> str:
    """``sha256:`` over the folder's files (relative path, size and bytes, in path order).
    Hidden files (``.gitattributes``, editors' and copiers' leftovers) are not part of an artifact."""
    root = Path(folder)
    h = hashlib.sha256()
    files = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())
    for p in files:
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        h.update(f"{rel.as_posix()}\0{p.stat().st_size}\0".encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def verify(folder: str | Path, expected: str) -> None:
    """Raise ArtifactError unless the folder's digest is ``expected``."""
    found = digest(folder)
    if found != expected:
        raise ArtifactError(f"{folder}: checksum {found[:19]}... differs from the registered {expected[:19]}...; "
                            "the files changed after registration (or are still being copied): refusing to load them")


def fetch_verified(uri: str, expected: str | None) -> Path:
    """:func:`fetch`, then :func:`verify` where a checksum was recorded."""
    folder = fetch(uri)
    if expected:
        verify(folder, expected)
    return folder
