"""A pca-K store's channel basis: fitted once on the first shard's whitened targets, written before any shard.

The file is `basis/pca.npz`, a zip of one `basis.npy` (float32 [C, K], the columns orthonormal): numpy alone reads
it (`np.load(path)["basis"]`), and the zip's CRC-32 lets a resumed extraction tell a damaged file from a good one
before it quantizes anything against it. The manifest lists it with its sha256 among `metadata_files`, so `verify`
hashes it and a reader checks it when the store opens.

The fit is deterministic: the uncentred second moment of every finite token of the first shard (all its views),
summed in float64, its top K eigenvectors orthogonal to the all-ones vector, each signed so that its largest entry
is positive. The first shard should hold many more tokens than K (a CLIP-L shard: 191 images x 8 views x 257).
Every rank fits it and writes it only where it is absent (`StoreLocation.put_new`), then reads back the file that is
there, so the ranks of one job, and a resume, use one basis.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import torch

from ..errors import StoreError

NAME = "basis/pca.npz"
MEMBER = "basis.npy"


class SecondMoment:
    """Sum of x x^T over the finite tokens of the batches added (float64 [C, C]), on the targets' device."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.tokens = 0

    @torch.no_grad()
    def add(self, y: torch.Tensor) -> None:
        x = y.reshape(-1, y.shape[-1])
        x = x[torch.isfinite(x).all(-1)].double()
        self.sum = x.T @ x if self.sum is None else self.sum.add_(x.T @ x)
        self.tokens += len(x)

    def basis(self, k: int) -> np.ndarray:
        """The top-k eigenvectors, float32 [C, k]; refused in one line when the sample has no finite token."""
        if self.sum is None or self.tokens == 0:
            raise StoreError("the first shard has no finite targets to fit the pca basis on (every image failed); "
                             "fix the images or choose another --dtype")
        return fit(self.sum.cpu().numpy(), k)


def fitted(sample: np.ndarray | torch.Tensor, k: int) -> np.ndarray:
    """The basis [C, k] of one sample of targets [..., C] (what extraction fits on the first shard)."""
    moment = SecondMoment()
    moment.add(torch.as_tensor(sample))
    return moment.basis(k)


def fit(moment: np.ndarray, k: int) -> np.ndarray:
    """The top-k eigenvectors of a symmetric [C, C] moment as float32 [C, k], largest first, each signed so that
    its largest-magnitude entry is positive (eigh's signs are arbitrary).

    Every column is orthogonal to the all-ones vector, so that a reconstruction keeps a whitened token's mean of 0
    even where the sample leaves directions unfilled (fewer tokens than K): the moment is projected off that
    vector, which then gets eigenvalue -1, below every other."""
    m = np.asarray(moment, dtype=np.float64)
    ones = np.full((len(m), 1), len(m) ** -0.5)
    p = np.eye(len(m)) - ones @ ones.T
    w, v = np.linalg.eigh(p @ m @ p - ones @ ones.T)
    top = v[:, np.argsort(w)[::-1][:k]]
    signs = np.sign(top[np.abs(top).argmax(0), np.arange(top.shape[1])])
    return np.ascontiguousarray(top * np.where(signs == 0, 1.0, signs), dtype=np.float32)


def encode(basis: np.ndarray) -> bytes:
    """The file's bytes, the same for the same basis (a fixed zip timestamp)."""
    member = io.BytesIO()
    np.lib.format.write_array(member, np.ascontiguousarray(basis, dtype="<f4"), allow_pickle=False)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        z.writestr(zipfile.ZipInfo(MEMBER, date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
    return out.getvalue()


def decode(data: bytes, where: str, channels: int, k: int) -> np.ndarray:
    """The basis [C, K] of a file's bytes, refused in one line naming `where` when it is not a whole basis of
    that shape (a bad CRC, another member, another dtype or shape, a value that is not finite)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            if z.namelist() != [MEMBER]:
                raise ValueError(f"holds {z.namelist()}, not [{MEMBER!r}]")
            raw = z.read(MEMBER)  # checks the member's CRC-32
        basis = np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise StoreError(f"{where} is corrupt ({e}); the store's pca coefficients cannot be read without it: "
                         "extract the store again, or take it from its source") from None
    if basis.dtype != np.float32 or basis.shape != (channels, k) or not np.isfinite(basis).all():
        raise StoreError(f"{where} holds a {basis.dtype} {list(basis.shape)} basis, where the manifest needs finite "
                         f"float32 [{channels}, {k}]; the store is damaged or was not written by fdpipe")
    return basis


def missing(where: str) -> StoreError:
    return StoreError(f"{where} is missing; a pca store's targets cannot be read without its basis: extract the "
                      "store again, or take it from its source")


def read(loc, channels: int, k: int, entry: dict | None = None, *, listed: bool = False) -> np.ndarray:
    """The store's basis [C, K], refused in one line naming the file when it is missing or damaged. entry: the
    file's record in a complete store's metadata_files (its bytes and sha256 are checked); listed: a complete
    store's manifest must have that record."""
    import hashlib

    where = loc.path(NAME)
    if listed and entry is None:
        raise StoreError(f"{where} is not among the manifest's metadata_files, which a pca store's must list; the "
                         "manifest is damaged or was not written by fdpipe")
    if not loc.exists(NAME):
        raise missing(where)
    data = loc.read_bytes(NAME, expect=entry, limit=None if entry else channels * k * 4 + 4096)
    if entry is not None and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise StoreError(f"{where}: sha256 mismatch (the file is corrupt); the store's pca coefficients cannot be "
                         "read without it: extract the store again, or take it from its source")
    return decode(data, where, channels, k)
