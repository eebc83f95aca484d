"""The byte layout of a payload inside a slot: packing, checksums, unpacking, and read spans.

A payload is a named set of tensors laid out back to back in one slot, each
starting at a ``ALIGNMENT``-byte boundary, described by one ``TensorEntry`` per
tensor (the entries travel in the signed descriptor). Bytes are copied as they
are -- a bfloat16 tensor is viewed as bytes, never converted -- so the consumer
gets bit-identical tensors.

Producer: ``pack_tensors`` -> (entries, checksum) -> descriptor.
Consumer: ``transfer_spans`` (what to read, merged so one batch read covers a
multi-tensor payload) -> read into private memory -> ``views_verified`` (the
tensors are views of it, after its checksum matched the descriptor's); or, where
the transport can only write registered memory, read into a receive slot ->
``unpack_verified`` (copy out, so the slot is released at once, and verify the
copies).

The checksum covers exactly the entries' bytes, in entry order, never the
padding between them. It is ``"<algorithm>:<hex>"``: xxh3_128 when the
``xxhash`` package is installed (several GB/s), else blake2b-128 from the
standard library; a consumer verifies with the algorithm the string names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import torch

from scheduler.core.descriptors import DTYPE_ITEMSIZE, TensorEntry

if TYPE_CHECKING:
    from collections.abc import Callable

_xxhash: ModuleType | None
try:
    import xxhash as _xxhash
except ImportError:  # the fallback is slower but always there
    _xxhash = None

# 256 bytes covers every dtype's alignment and the widest SIMD loads when a consumer views the slot in place.
ALIGNMENT = 256

# Copies that are also hashed go in pieces this size: the hash reads each piece while it is still in
# the core's L2, so the payload crosses memory once instead of being copied and then re-read cold
# (18.5 MiB at 720p: 2.4 ms instead of 3.4 ms on a 2-core EPYC VM, bench/README.md).
COPY_HASH_CHUNK = 256 * 1024

# The dtype names TensorEntry accepts (its ``dtype`` Literal), keyed by the torch dtype they name.
DtypeName = Literal["float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "bool"]
_TORCH_DTYPE_NAMES: dict[torch.dtype, DtypeName] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.uint8: "uint8",
    torch.bool: "bool",
}
_TORCH_DTYPES: dict[str, torch.dtype] = {name: dtype for dtype, name in _TORCH_DTYPE_NAMES.items()}
# A new dtype must be added to the descriptor schema and here together; fail at import, not mid-job.
if set(_TORCH_DTYPES) != set(DTYPE_ITEMSIZE):
    raise RuntimeError("workers.transfer.packing and scheduler.core.descriptors disagree on the payload dtypes")


class PayloadTooLarge(ValueError):
    """The tensors do not fit one slot; raise ``slot_mb`` or shrink the job."""


class ChecksumMismatch(ValueError):
    """The bytes read do not match the descriptor's checksum: the transfer or the producer's slot is corrupt."""


class SlotBytes(Protocol):
    """Anything that exposes a slot's bytes as a uint8 tensor (``Slot`` does)."""

    def view(self) -> torch.Tensor: ...


def _hasher(algorithm: str) -> Any:
    if algorithm == "xxh3_128":
        if _xxhash is None:
            raise ChecksumMismatch(
                "payload checksum is xxh3_128 but the xxhash package is not installed: pip install xxhash"
            )
        return _xxhash.xxh3_128()
    if algorithm == "blake2b":
        return hashlib.blake2b(digest_size=16)
    raise ChecksumMismatch(f"unknown payload checksum algorithm {algorithm!r}")


DEFAULT_CHECKSUM = "xxh3_128" if _xxhash is not None else "blake2b"


def _aligned(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's bytes (no dtype conversion)."""
    return tensor.reshape(-1).view(torch.uint8)


def pack_tensors(tensors: Mapping[str, torch.Tensor], slot: SlotBytes) -> tuple[list[TensorEntry], str]:
    """Copy ``tensors`` into ``slot`` at aligned offsets, in the mapping's order; return entries and checksum."""
    # Plan the whole layout before writing a byte, so a too-large payload leaves the slot untouched.
    view = slot.view()
    entries: list[TensorEntry] = []
    offset = 0
    for name, tensor in tensors.items():
        dtype_name = _TORCH_DTYPE_NAMES.get(tensor.dtype)
        if dtype_name is None:
            raise ValueError(
                f"tensor {name!r} has dtype {tensor.dtype}, which a payload cannot carry "
                f"(supported: {', '.join(_TORCH_DTYPES)})"
            )
        nbytes = tensor.numel() * tensor.element_size()
        entries.append(
            TensorEntry(name=name, dtype=dtype_name, shape=tuple(tensor.shape), offset=offset, nbytes=nbytes)
        )
        offset = _aligned(offset + nbytes)
    end = payload_end(entries)
    if end > view.numel():
        raise PayloadTooLarge(
            f"payload of {len(entries)} tensors needs {end} bytes but a slot holds {view.numel()}; "
            "raise transfer.slot_mb or shrink the job"
        )
    algorithm = DEFAULT_CHECKSUM
    hasher = _hasher(algorithm)
    for entry, tensor in zip(entries, tensors.values(), strict=True):
        if not entry.nbytes:
            continue
        # contiguous() makes the byte view legal; a GPU tensor comes down to the host slot in one copy.
        source = _as_bytes(tensor.detach().contiguous())
        target = view[entry.offset : entry.offset + entry.nbytes]
        if source.device.type == "cpu" and target.device.type == "cpu":
            _copy_hashing(target, source, hasher.update)
        else:
            target.copy_(source)
            hasher.update(target.cpu().numpy())
    return entries, f"{algorithm}:{hasher.hexdigest()}"


def _copy_hashing(target: torch.Tensor, source: torch.Tensor, update: Callable[[Any], None]) -> None:
    """``target[:] = source`` for host uint8 tensors, hashing the *copied* bytes as they land."""
    dst, src = target.numpy(), source.numpy()
    landed = dst.data  # a memoryview: slicing it costs no numpy object per piece
    for start in range(0, dst.size, COPY_HASH_CHUNK):
        end = start + COPY_HASH_CHUNK
        np.copyto(dst[start:end], src[start:end])
        update(landed[start:end])


def payload_checksum(slot_view: torch.Tensor, entries: Sequence[TensorEntry], algorithm: str | None = None) -> str:
    """Checksum of exactly the entries' bytes in ``slot_view`` (a uint8 tensor), as ``"<algorithm>:<hex>"``."""
    host = slot_view if slot_view.device.type == "cpu" else slot_view.cpu()
    for entry in entries:
        if entry.offset + entry.nbytes > host.numel():
            raise PayloadTooLarge(f"tensor {entry.name} ends past the slot's {host.numel()} bytes")
    return _digest((host[e.offset : e.offset + e.nbytes] for e in entries), algorithm or DEFAULT_CHECKSUM)


def _digest(byte_views: Iterable[torch.Tensor], algorithm: str) -> str:
    """``"<algorithm>:<hex>"`` over host uint8 tensors, in order (empty ones add nothing)."""
    hasher = _hasher(algorithm)
    update: Callable[[Any], None] = hasher.update
    for view in byte_views:
        if view.numel():
            # numpy() is a zero-copy view; the hashers read it through the buffer protocol.
            update(view.numpy())
    return f"{algorithm}:{hasher.hexdigest()}"


def bytes_checksum(data: bytes | memoryview, algorithm: str | None = None) -> str:
    """``"<algorithm>:<hex>"`` of a whole byte string, with the payload hashers (checkpoint objects)."""
    hasher = _hasher(algorithm or DEFAULT_CHECKSUM)
    hasher.update(data)
    return f"{algorithm or DEFAULT_CHECKSUM}:{hasher.hexdigest()}"


def verify_bytes(data: bytes | memoryview, expected: str) -> None:
    """Raise ``ChecksumMismatch`` unless ``data`` hashes to ``expected`` (with the algorithm it names)."""
    actual = bytes_checksum(data, _algorithm_of(expected))
    if actual != expected:
        raise ChecksumMismatch(f"checksum is {actual}, expected {expected}")


def _algorithm_of(checksum: str) -> str:
    algorithm, sep, _ = checksum.partition(":")
    if not sep:
        raise ChecksumMismatch(f"payload checksum {checksum!r} does not name its algorithm")
    return algorithm


def verify_checksum(slot_view: torch.Tensor, entries: Sequence[TensorEntry], expected: str) -> None:
    """Raise ``ChecksumMismatch`` unless the slot's entry bytes hash to ``expected`` (same algorithm)."""
    actual = payload_checksum(slot_view, entries, _algorithm_of(expected))
    if actual != expected:
        raise ChecksumMismatch(f"payload checksum is {actual}, the descriptor says {expected}")


def unpack_verified(
    slot: SlotBytes, entries: Sequence[TensorEntry], expected: str, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """``unpack_tensors``, with the bytes the stage will use proven to hash to ``expected``.

    On the host the copy is what gets verified (copy, then hash the copy): transfer-engine
    peers can write into registered memory, so bytes verified in the slot could still change
    before the copy; private copies cannot, and hashing them costs the same as hashing the
    slot. On an accelerator the slot is verified and then copied to the device -- the copy
    the stage needs anyway -- so the window is that one copy.
    """
    algorithm = _algorithm_of(expected)
    if torch.device(device).type != "cpu":
        verify_checksum(slot.view(), entries, expected)
        return unpack_tensors(slot, entries, device)
    view = slot.view()
    hasher = _hasher(algorithm)
    out: dict[str, torch.Tensor] = {}
    for entry in entries:
        raw = _entry_bytes(view, entry, out)
        owned = torch.empty(entry.nbytes, dtype=torch.uint8)
        _copy_hashing(owned, raw, hasher.update)
        out[entry.name] = owned.view(_TORCH_DTYPES[entry.dtype]).reshape(entry.shape)
    actual = f"{algorithm}:{hasher.hexdigest()}"
    if actual != expected:
        raise ChecksumMismatch(f"payload checksum is {actual}, the descriptor says {expected}")
    return out


def views_verified(
    buffer: SlotBytes, entries: Sequence[TensorEntry], expected: str, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Tensors that *are* ``buffer``'s bytes (no copy on the host), once those bytes hash to ``expected``.

    Only for private memory the caller owns (a ``LandingBuffer``): nobody else can write
    it, so what was verified is what the stage computes on. On an accelerator the verified
    bytes are copied to the device.
    """
    verify_checksum(buffer.view(), entries, expected)
    typed = _typed_views(buffer.view(), entries)
    if torch.device(device).type == "cpu":
        return typed
    return {name: tensor.to(device, copy=True) for name, tensor in typed.items()}


def unpack_tensors(
    slot: SlotBytes, entries: Sequence[TensorEntry], device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Tensors rebuilt from the slot, each owning its memory so the slot can be released at once.

    On an accelerator the copy out of the slot *is* the host-to-device copy the stage
    needs anyway: one pass over the payload instead of a host clone and a second copy.
    """
    on_cpu = torch.device(device).type == "cpu"
    return {
        name: tensor.clone() if on_cpu else tensor.to(device, copy=True)
        for name, tensor in _typed_views(slot.view(), entries).items()
    }


def _typed_views(view: torch.Tensor, entries: Sequence[TensorEntry]) -> dict[str, torch.Tensor]:
    """Each entry's bytes in ``view`` as a tensor of its dtype and shape (views, no copy), after the checks."""
    out: dict[str, torch.Tensor] = {}
    for entry in entries:
        out[entry.name] = _entry_bytes(view, entry, out).view(_TORCH_DTYPES[entry.dtype]).reshape(entry.shape)
    return out


def _entry_bytes(view: torch.Tensor, entry: TensorEntry, unpacked: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The slot bytes of one entry, after the checks that make viewing them as the entry's tensor legal."""
    if entry.nbytes != entry.expected_nbytes():
        raise ValueError(
            f"tensor {entry.name}: nbytes {entry.nbytes} does not match shape {entry.shape} and dtype {entry.dtype}"
        )
    if entry.offset + entry.nbytes > view.numel():
        raise PayloadTooLarge(f"tensor {entry.name} ends past the slot's {view.numel()} bytes")
    if entry.name in unpacked:
        raise ValueError(f"payload names tensor {entry.name!r} twice")
    return view[entry.offset : entry.offset + entry.nbytes]


def payload_end(entries: Sequence[TensorEntry]) -> int:
    """One past the last byte any entry uses: how large a slot must be to hold the payload."""
    return max((e.offset + e.nbytes for e in entries), default=0)


def payload_nbytes(entries: Sequence[TensorEntry]) -> int:
    """The tensor bytes the payload carries (padding excluded)."""
    return sum(e.nbytes for e in entries)


def transfer_spans(entries: Sequence[TensorEntry], max_gap: int = ALIGNMENT) -> list[tuple[int, int]]:
    """(offset, nbytes) ranges to read, in offset order, covering every entry's bytes.

    Entries closer than ``max_gap`` bytes are merged, reading the alignment padding
    between them, so a payload packed by ``pack_tensors`` is one span: one read.
    Empty tensors need no bytes and get no span.
    """
    spans: list[tuple[int, int]] = []
    for entry in sorted((e for e in entries if e.nbytes), key=lambda e: e.offset):
        start, end = entry.offset, entry.offset + entry.nbytes
        if spans:
            last_start, last_len = spans[-1]
            last_end = last_start + last_len
            if start - last_end < max_gap:
                spans[-1] = (last_start, max(last_end, end) - last_start)
                continue
        spans.append((start, end - start))
    return spans
