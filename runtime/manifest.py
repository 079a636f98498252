"""The artifact manifest: ``DIR/manifest.json``, written by export, read and checked by the runtime."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from spectrt.runtime.contract import CONTRACT_VERSION, graph_spec
from spectrt.runtime.errors import ArtifactError

MANIFEST = "manifest.json"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Artifact:
    """An exported directory and its parsed manifest."""

    root: Path
    manifest: dict

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def max_context(self) -> int:
        return int(self.manifest["max_context"])

    def has_graph(self, name: str) -> bool:
        return name in self.manifest.get("graphs", {})

    def graph_path(self, name: str) -> Path:
        if not self.has_graph(name):
            raise ArtifactError(f"{self.root}: the artifact has no '{name}' graph")
        return self.root / self.manifest["graphs"][name]["file"]

    def path(self, rel: str) -> Path:
        return self.root / rel

    def verify_hashes(self) -> None:
        """Re-hash every graph file listed in the manifest (slow for large graphs; used by `check`)."""
        for name, g in self.manifest.get("graphs", {}).items():
            for rel, digest in g.get("sha256", {}).items():
                p = self.root / rel
                if not p.is_file():
                    raise ArtifactError(f"{p}: missing (listed in the manifest for graph '{name}')")
                if sha256_file(p) != digest:
                    raise ArtifactError(f"{p}: sha256 does not match the manifest; re-export the model")


def load_artifact(root: str | os.PathLike) -> Artifact:
    """Read and check ``root/manifest.json``; raises ArtifactError with a one-line reason."""
    root = Path(root)
    if not root.is_dir():
        raise ArtifactError(f"{root}: not a directory (expected the output of `spectrt export`)")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{mpath}: missing; is {root} an export directory?")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath}: corrupt manifest ({e})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{mpath}: corrupt manifest (not a JSON object)")
    version = manifest.get("contract_version")
    if version != CONTRACT_VERSION:
        raise ArtifactError(
            f"{mpath}: made for I/O contract {version!r}, this spectrt speaks {CONTRACT_VERSION!r}; re-export the model")
    for key in ("model", "dtype", "max_context", "graphs"):
        if key not in manifest:
            raise ArtifactError(f"{mpath}: corrupt manifest (no '{key}')")
    for name, g in manifest["graphs"].items():
        try:
            graph_spec(name)
        except KeyError:
            raise ArtifactError(f"{mpath}: unknown graph '{name}'") from None
        f = root / g.get("file", "")
        if not f.is_file():
            raise ArtifactError(f"{f}: missing graph file listed in the manifest")
        for rel in g.get("sha256", {}):
            p = root / rel
            if not p.is_file():
                raise ArtifactError(f"{p}: missing (listed in the manifest for graph '{name}')")
            size = g.get("bytes", {}).get(rel)
            if size is not None and p.stat().st_size != size:
                raise ArtifactError(f"{p}: size {p.stat().st_size} != {size} in the manifest (truncated or replaced)")
    return Artifact(root, manifest)


def write_manifest(root: str | os.PathLike, manifest: dict) -> None:
    Path(root, MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
