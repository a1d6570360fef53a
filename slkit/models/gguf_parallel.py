"""Dequantising a GGUF file's tensors in parallel, for transformers' GGUF loader to pick up.

transformers loads an architecture its newer GGUF path does not cover (qwen2 among them, in 5.17 and
5.24) with `modeling_gguf_pytorch_utils.load_gguf_checkpoint`, which does

    from gguf import GGUFReader, dequantize      # inside the function: read from the module at each call
    reader = GGUFReader(path)                    # parses all the metadata, every time
    for tensor in reader.tensors:
        weights = dequantize(tensor.data, tensor.tensor_type)   # gguf-py, numpy, one tensor after another

and a conversion calls it three times (tokenizer, config, weights). Parsing a 150k-token vocabulary and
dequantising are almost all of a conversion's time, on one core. `parallel_gguf_loading(path, workers)`
is a context manager that, while it is open, makes both names answer from work done ahead:

- the quantized tensors, found with a small reader of the file's tensor table, are dequantised by
  `workers` forked processes in row ranges (rows are independent blocks: the values are those of one
  call over the whole tensor) into one anonymous shared memory map, in the file's order, which is the
  order the loader asks in; the pool starts before the loader does, so the work overlaps its parsing;
- `gguf.GGUFReader(path)` returns one reader of `path`, parsed once (on a plain ndarray view of the
  file's map, which parses about 4 times faster than on numpy's memmap subclass), whose tensors are
  checked against the table read ahead;
- `gguf.dequantize(data, qtype)` answers a quantized tensor of that reader from the map once its ranges
  are done. Anything else (another file, f32/f16 tensors, a tensor asked for a second time, any
  mismatch, a failed worker) goes to gguf's own dequantize, so the values never depend on the hook.

A tensor's pages are given back once the array handed out for it (and every view of it) is gone: the
loader copies each tensor to torch before it asks for the one after next. Nothing here knows tensor
names: transformers still maps the names and builds the config and the tokenizer.
`unavailable_reason()` says why the hook cannot serve the installed transformers/gguf or this file; the
caller then loads the ordinary way.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import math
import mmap
import multiprocessing
import os
import re
import struct
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

WORKERS_ENV = "SLKIT_CONVERT_WORKERS"
_PAGE = mmap.PAGESIZE
_LOCK = threading.Lock()  # one hook at a time: it patches module attributes of gguf
_SHARED: mmap.mmap | None = None  # the output map, inherited by the forked workers


def conversion_workers(workers: int | None = None) -> int:
    """How many processes dequantise: `workers`, else $SLKIT_CONVERT_WORKERS, else the CPUs this process
    may run on (os.sched_getaffinity)."""
    if workers is None:
        env = os.environ.get(WORKERS_ENV, "").strip()
        if env:
            try:
                workers = int(env)
            except ValueError:
                raise ValueError(f"${WORKERS_ENV} must be a whole number of processes, not {env!r}") from None
    if workers is None:
        try:
            workers = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            workers = os.cpu_count() or 1
    return max(1, workers)


def unavailable_reason(gguf_path: str | os.PathLike, workers: int) -> str | None:
    """None when the parallel hook can serve transformers' loader for this file, else why not."""
    if workers < 2:
        return f"{workers} worker process (${WORKERS_ENV} or the CPU count)"
    if "fork" not in multiprocessing.get_all_start_methods():
        return "this platform cannot fork worker processes"
    try:
        import gguf
        from gguf import quants
    except ImportError as err:
        return f"gguf is not importable ({err})"
    if not callable(getattr(gguf, "dequantize", None)) or not callable(getattr(gguf, "GGUFReader", None)) \
            or not callable(getattr(quants, "dequantize", None)):
        return "the installed gguf package has no gguf.dequantize / gguf.GGUFReader"
    try:
        # probed by name: the module's place differs between transformers versions
        legacy = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
        source = inspect.getsource(legacy.load_gguf_checkpoint)
    except (ImportError, AttributeError, OSError, TypeError) as err:
        return f"transformers' load_gguf_checkpoint cannot be inspected ({err})"
    # The hook replaces module attributes of gguf; the loader must look them up when it runs.
    if not re.search(r"^\s+from gguf import [^\n]*\bGGUFReader\b[^\n]*\bdequantize\b", source, re.MULTILINE) \
            or not re.search(r"=\s*dequantize\(\s*tensor\.data\s*,\s*tensor\.tensor_type\s*\)", source):
        return "transformers' load_gguf_checkpoint no longer imports gguf's dequantize per call as expected"
    try:
        architecture = read_tensor_table(gguf_path)[0]
    except Exception as err:  # noqa: BLE001 - any unreadable header: the ordinary loader reports it
        return f"the GGUF tensor table could not be read ({err})"
    try:  # transformers >= 5.17 loads some architectures through its own torch path, not load_gguf_checkpoint
        is_gguf_arch_supported = importlib.import_module("transformers.integrations.gguf.utils").is_gguf_arch_supported
    except (ImportError, AttributeError):
        is_gguf_arch_supported = None
    if is_gguf_arch_supported is not None and is_gguf_arch_supported(architecture):
        return f"transformers loads {architecture!r} GGUF files with its own dequantizer, not gguf's"
    return None


@dataclass(frozen=True)
class TableEntry:
    """One tensor of a GGUF file, as its tensor table gives it."""
    name: str
    qtype: int
    dims: tuple[int, ...]  # numpy order (the file stores them reversed)
    data_offset: int  # from the start of the file


_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY = 8, 9


def read_tensor_table(gguf_path: str | os.PathLike) -> tuple[str, list[TableEntry]]:
    """(general.architecture, the tensor table) of a little-endian GGUF v2/v3 file, without building the
    metadata objects gguf.GGUFReader builds (that takes seconds for a 150k-token vocabulary); the hook
    checks every entry it uses against the reader transformers opens."""

    with open(gguf_path, "rb") as f:
        blob = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        if blob[:4] != b"GGUF":
            raise ValueError("not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", blob, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (big-endian, or unknown)")
        pos = 24

        def string(at: int) -> tuple[bytes, int]:
            (n,) = struct.unpack_from("<Q", blob, at)
            return blob[at + 8:at + 8 + n], at + 8 + n

        def skip(at: int, vtype: int) -> int:
            if vtype in _SCALARS:
                return at + _SCALARS[vtype]
            if vtype == _STRING:
                return string(at)[1]
            if vtype == _ARRAY:
                itype, count = struct.unpack_from("<IQ", blob, at)
                at += 12
                if itype in _SCALARS:
                    return at + count * _SCALARS[itype]
                for _ in range(count):
                    at = skip(at, itype)
                return at
            raise ValueError(f"unknown GGUF value type {vtype}")

        architecture, alignment = "", 32
        for _ in range(n_kv):
            key, pos = string(pos)
            (vtype,) = struct.unpack_from("<I", blob, pos)
            pos += 4
            if key == b"general.architecture" and vtype == _STRING:
                architecture = string(pos)[0].decode()
            elif key == b"general.alignment" and vtype == 4:
                (alignment,) = struct.unpack_from("<I", blob, pos)
            pos = skip(pos, vtype)
        infos = []
        for _ in range(n_tensors):
            name, pos = string(pos)
            (n_dims,) = struct.unpack_from("<I", blob, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", blob, pos + 4)
            qtype, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            infos.append((name.decode(), qtype, tuple(reversed(dims)), offset))
        start = -(-pos // alignment) * alignment
        return architecture, [TableEntry(n, q, d, start + o) for n, q, d, o in infos]
    finally:
        blob.close()


@dataclass
class _Slot:
    """One quantized tensor: where its float32 values go in the shared map, and the jobs that fill it."""
    entry: TableEntry
    byte_shape: tuple[int, ...]  # the shape of the reader's tensor.data (uint8 blocks)
    offset: int  # of its values in the shared map (page-aligned)
    nbytes: int
    futures: list[Future] = field(default_factory=list)
    served: weakref.ref | None = None
    released: bool = False


def _dequantize_rows(path: str, data_offset: int, row_bytes: int, rows: tuple[int, int], qtype: int,
                     out_offset: int, row_values: int) -> None:
    """In a worker: rows [start, stop) of one tensor's blocks -> float32 values at out_offset of the map."""
    from gguf import quants

    start, stop = rows
    blocks = np.memmap(path, dtype=np.uint8, mode="r", offset=data_offset + start * row_bytes,
                       shape=(stop - start, row_bytes))
    values = quants.dequantize(blocks, qtype)
    out = np.frombuffer(_SHARED, dtype=np.float32, count=(stop - start) * row_values,
                        offset=out_offset + start * row_values * 4)
    out[:] = values.reshape(-1)
    del blocks


def _plain_array_reader(reader_class: Any) -> Any:
    """gguf's reader class, keeping the file's memory map as a plain ndarray view (`self.data`).

    The reader slices `self.data` a few times per metadata value (3 million times for a 150k-token
    vocabulary); on numpy's memmap subclass each slice runs memmap's Python-level __getitem__ and
    __array_finalize__, which makes up most of a parse (34 s against 9 s here). The bytes, the fields and
    the tensors are the same; only their array type differs."""

    class PlainArrayReader(reader_class):
        @property
        def data(self) -> Any:
            return self._slkit_plain

        @data.setter
        def data(self, value: Any) -> None:
            self._slkit_plain = value.view(np.ndarray)  # keeps `value`, and so the map, alive as its base

    return PlainArrayReader


class ParallelDequantizer:
    """The replacements for gguf.GGUFReader and gguf.dequantize while parallel_gguf_loading is open."""

    def __init__(self, path: str, slots: dict[int, _Slot], original_reader: Any, original_dequantize: Any):
        self.path, self.slots = path, slots
        self.original_reader, self.original_dequantize = original_reader, original_dequantize
        self.reader: Any = None
        self.served = 0  # tensors answered from the workers' results
        self.wait_s = 0.0  # time the loader waited for them
        self.problem: str | None = None  # why the hook stopped answering, if it did

    def make_reader(self, path: Any, mode: str = "r") -> Any:
        """gguf.GGUFReader: `path` is parsed once and the reader reused."""
        try:
            same = mode == "r" and os.path.samefile(path, self.path)
        except (OSError, TypeError):
            same = False
        if not same:
            return self.original_reader(path, mode)
        if self.reader is None:
            self.reader = _plain_array_reader(self.original_reader)(path, mode)
            self._check_table()
        return self.reader

    def _check_table(self) -> None:
        """The slots came from read_tensor_table; they must be the reader's own tensors."""
        tensors = {int(t.data_offset): t for t in self.reader.tensors}
        for slot in self.slots.values():
            tensor = tensors.get(slot.entry.data_offset)
            if tensor is None or tensor.name != slot.entry.name or int(tensor.tensor_type) != slot.entry.qtype \
                    or tuple(tensor.data.shape) != slot.byte_shape:
                self.problem = f"tensor {slot.entry.name}: the table read ahead does not match gguf's reader"
                return

    def dequantize(self, data: Any, qtype: Any) -> Any:
        """gguf.dequantize: a tensor of the reader's file answered from the shared map, anything else by gguf."""

        self._release_consumed()
        slot = self._slot(data, qtype)
        if slot is None:
            return self.original_dequantize(data, qtype)
        begin = time.perf_counter()
        try:
            for future in slot.futures:
                future.result()
        except Exception as err:  # noqa: BLE001 - a dead worker: the slower way still gives the same values
            self.problem = f"a worker failed ({type(err).__name__}: {err})"
            log.warning("parallel GGUF dequantisation stopped, the remaining tensors are done one after "
                        "another: %s", self.problem)
            return self.original_dequantize(data, qtype)
        self.wait_s += time.perf_counter() - begin
        values = np.frombuffer(_SHARED, dtype=np.float32, count=slot.nbytes // 4, offset=slot.offset)
        values = values.reshape(slot.entry.dims)
        slot.served = weakref.ref(values)
        self.served += 1
        return values

    def _slot(self, data: Any, qtype: Any) -> _Slot | None:
        """The slot of `data` if it is a quantized tensor of the cached reader, not answered before."""

        if self.problem is not None or self.reader is None or _SHARED is None \
                or not isinstance(data, np.ndarray) or data.base is not self.reader.data:
            return None
        slot = self.slots.get(data.ctypes.data - self.reader.data.ctypes.data)
        if slot is None or slot.served is not None or int(qtype) != slot.entry.qtype \
                or tuple(data.shape) != slot.byte_shape or data.dtype != np.uint8:
            return None
        return slot

    def _release_consumed(self) -> None:
        """Give back the pages of tensors whose handed-out arrays (and every view of them) are gone."""
        for slot in self.slots.values():
            if slot.served is not None and not slot.released and slot.served() is None:
                slot.released = True
                with contextlib.suppress(OSError, AttributeError, ValueError):  # only saves memory
                    _SHARED.madvise(mmap.MADV_REMOVE, slot.offset, _round_up(slot.nbytes))


def _round_up(n: int) -> int:
    return -(-n // _PAGE) * _PAGE


@contextlib.contextmanager
def parallel_gguf_loading(gguf_path: str | os.PathLike, workers: int) -> Iterator[ParallelDequantizer]:
    """While open, gguf.GGUFReader/gguf.dequantize answer `gguf_path`'s tensors from `workers` forked
    processes (module docstring); check `unavailable_reason` first. Yields the hook: its `served` counts
    the tensors it answered, `problem` says why it stopped answering, if it did."""
    global _SHARED

    import gguf
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = os.path.realpath(gguf_path)
    with _LOCK:
        _, table = read_tensor_table(path)
        plain = {GGMLQuantizationType.F32, GGMLQuantizationType.F16}  # gguf only views or casts these
        slots: dict[int, _Slot] = {}
        offset = 0
        for entry in table:
            if entry.qtype in plain or entry.qtype not in GGML_QUANT_SIZES or not entry.dims:
                continue
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(entry.qtype)]
            if entry.dims[-1] % block:
                continue
            nbytes = math.prod(entry.dims) * 4
            byte_shape = (*entry.dims[:-1], entry.dims[-1] // block * size)
            slots[entry.data_offset] = _Slot(entry, byte_shape, offset, nbytes)
            offset += _round_up(nbytes)
        original_reader, original_dequantize = gguf.GGUFReader, gguf.dequantize
        _SHARED = mmap.mmap(-1, max(offset, _PAGE))  # anonymous and shared: the forked workers write into it
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        hook = ParallelDequantizer(path, {s.entry.data_offset: s for s in slots.values()}, original_reader,
                                   original_dequantize)
        try:
            total = sum(s.nbytes // 4 for s in slots.values())
            piece = max(1, total // (workers * 8))  # values per job: about 8 jobs per worker, big tensors split
            for slot in slots.values():  # the file's order, which is the order the loader asks in
                row_bytes, row_values = slot.byte_shape[-1], slot.entry.dims[-1]
                rows = slot.nbytes // 4 // row_values
                step = max(1, piece // row_values)
                for start in range(0, rows, step):
                    slot.futures.append(pool.submit(
                        _dequantize_rows, path, slot.entry.data_offset, row_bytes, (start, min(rows, start + step)),
                        slot.entry.qtype, slot.offset, row_values))
            # The loader reads both names from the module when it runs (unavailable_reason checks that).
            gguf.GGUFReader, gguf.dequantize = hook.make_reader, hook.dequantize
            yield hook
        finally:
            gguf.GGUFReader, gguf.dequantize = original_reader, original_dequantize
            pool.shutdown(wait=True, cancel_futures=True)
            shared, _SHARED = _SHARED, None
            with contextlib.suppress(BufferError):  # an array still viewing the map keeps it alive
                shared.close()
