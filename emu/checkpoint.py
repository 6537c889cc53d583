"""Checkpoints and the run's metrics log: written so that a crash, a kill or a full disk loses nothing
that was already saved.

A checkpoint is a dict {model, ema, opt, step, args, rng, ...} saved with torch.save. Writing goes
to a temporary file in the same directory, is fsync'ed, then renamed over the target, so a crash
mid-write never leaves a truncated checkpoint behind: the previous one stays whole until the new one
is complete. A write that fails (a full disk) is a one-line EmuError that says the previous file is
kept. Reading uses `weights_only=True`: tensors, numbers, strings, lists and dicts only.

The metrics log (metrics.jsonl) is append-only: one JSON object per line, each line written with a
single append and fsync'ed, never rewritten. A crash can leave at most a torn last line, which the
reader skips, and the next append starts on a fresh line.
"""
import errno
import glob
import json
import math
import os
import tempfile
import zipfile
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from emu import EmuError

TMP_PREFIX = ".tmp-"


def atomic_write(path, write):
    """Call write(tmp_path), fsync it, then rename it to `path` (and fsync the directory).

    Temporary files that a killed earlier write of the same `path` left behind are removed first.
    An OSError (no space left, a file-size limit, a read-only disk) becomes an EmuError; `path` is
    untouched either way.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    for stale in glob.glob(os.path.join(glob.escape(folder), f"{TMP_PREFIX}*{glob.escape(os.path.basename(path))}")):
        os.remove(stale)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX, suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        cause = e if isinstance(e, OSError) else e.__cause__ or e.__context__  # torch.save wraps OSErrors
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS):
            raise EmuError(f"{path}: could not be written ({os.strerror(cause.errno)}); the previous file, "
                           f"if any, is kept") from None
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path, obj):
    """Atomically torch.save `obj` (a dict of tensors / plain Python values) to `path`."""
    def write(tmp):
        with open(tmp, "wb") as f:  # a Python file, so that a failed write surfaces as the OSError it is
            torch.save(obj, f)
    atomic_write(path, write)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint written by save_checkpoint, refusing pickled code.

    Raises EmuError with the file name for a missing, truncated or foreign file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise EmuError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EmuError(f"{path}: not a readable checkpoint ({first_line[:200]})") from None
    if not isinstance(obj, dict):
        raise EmuError(f"{path}: not an emu checkpoint (expected a dict, got {type(obj).__name__})")
    return obj


def save_weights(path, state_dict, metadata=None):
    """Atomically write a state dict as safetensors (tensors only, contiguous copies)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    data = safetensors_bytes(tensors, metadata=metadata)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def checkpoint_problem(path):
    """None when `path` is an intact torch.save file (a zip whose every record matches its CRC),
    else what is wrong with it. Reads the file once, without unpickling anything."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        return f"not an intact checkpoint ({str(e)[:80] or type(e).__name__})"
    return None if bad is None else f"its record {bad} is corrupt"


def load_weights(path):
    """Read a safetensors file into a CPU state dict; EmuError naming the file (and the tensor) if it
    is missing, truncated or malformed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise EmuError(f"{path}: weights file not found")
    return read_safetensors(path)


def load_state_dict_checked(model, state_dict, path):
    """model.load_state_dict with one-line errors that name the file and the offending keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise EmuError(f"{path}: state dict does not match the model "
                       f"(missing {len(missing)}: {missing[:3]}, unexpected {len(unexpected)}: {unexpected[:3]})")
    for k, v in state_dict.items():
        if own[k].shape != v.shape:
            raise EmuError(f"{path}: shape mismatch for {k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}")
    model.load_state_dict(state_dict)


def config_to_dict(cfg):
    """A config dataclass as the plain values a checkpoint keeps (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(cfg).items()}


def config_from_dict(cls, d):
    """A config dataclass from a checkpoint's plain dict (lists back to tuples)."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def rng_state():
    """Every RNG state training depends on, as tensors (safe for weights_only loading)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------
# The metrics log


def append_metrics(path, record):
    """Append one JSON object as a line to `path`, durably: one write, then fsync.

    If a crash tore the file's last line, a newline is written first, so this record starts clean.
    """
    line = json.dumps(record, sort_keys=True) + "\n"
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = "\n" + line
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_metrics(path):
    """The records of a metrics log, in order; lines that a crash tore (not a JSON object) are skipped."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


# ----------------------------------------------------------------------------------------------------
# Reading safetensors

# The format's dtype names. Tensors are stored little-endian, as torch holds them on every machine we run on.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library refuses larger headers too


class SafetensorsFile:
    """One .safetensors file: the header is read and checked on opening, tensors are read on demand.

    The layout is an 8-byte little-endian header length, a JSON header mapping each tensor name to
    {"dtype", "shape", "data_offsets": [begin, end]} (offsets into the data that follows the header),
    then the data. `entries[name]` is (dtype, shape, begin, end).
    """

    def __init__(self, path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self.size = os.fstat(f.fileno()).st_size
                n = int.from_bytes(f.read(8), "little") if self.size >= 8 else -1
                if not 0 < n <= min(MAX_HEADER_BYTES, self.size - 8):
                    raise self.error(f"not a safetensors file (header length {n}, file of {self.size} bytes)")
                header = json.loads(f.read(n))
        except OSError as e:
            raise EmuError(f"{self.path}: cannot read ({e.strerror})") from None
        except (ValueError, UnicodeDecodeError):
            raise self.error("not a safetensors file (header is not JSON)") from None
        if not isinstance(header, dict):
            raise self.error("not a safetensors file (header is not a JSON object)")
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries = {key: self._check_entry(key, entry) for key, entry in header.items()}
        spans = sorted((begin, end, key) for key, (_, _, begin, end) in self.entries.items() if end > begin)
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
            if begin < end:
                raise self.error(f"{second}: its bytes overlap those of {first}")

    def error(self, message):
        return EmuError(f"{self.path}: {message}")

    def _check_entry(self, key, entry):
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise self.error(f"{key}: malformed header entry {str(entry)[:80]}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if min(shape, default=0) < 0 or begin < 0 or end - begin != nbytes:
            raise self.error(f"{key}: data_offsets [{begin}, {end}] do not fit a {entry['dtype']} tensor of shape "
                             f"{list(shape)} ({nbytes} bytes)")
        if self.data_start + end > self.size:
            raise self.error(f"{key}: data ends at byte {self.data_start + end} but the file has {self.size}; "
                             f"truncated?")
        return dtype, shape, begin, end

    def read(self, key):
        """Tensor `key` on the CPU in the file's dtype."""
        return self.read_rows(key, 0, None)

    def read_rows(self, key, start, stop, file=None):
        """Rows start..stop (along the first dimension; stop None: to the end) of tensor `key`, on the
        CPU in the file's dtype, with one seek and one read. `file`: this file already open, to reuse."""
        dtype, shape, begin, end = self.entries[key]
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        stop = (shape[0] if shape else 1) if stop is None else stop
        out = torch.empty((stop - start, *shape[1:]) if shape else (), dtype=dtype)
        data = out.view(-1).view(torch.uint8)  # the same memory, as bytes for the read to fill
        with (open(self.path, "rb", buffering=0) if file is None else nullcontext(file)) as f:
            self._read_exactly(f, self.data_start + begin + start * row_bytes, memoryview(data.numpy()), key)
        return out

    def copy_into(self, key, out, scratch):
        """Copy tensor `key` into `out` (a contiguous tensor of the same shape, any dtype, any device),
        converting as it goes, one chunk of the file at a time.

        :param scratch: a reusable uint8 CPU buffer; each chunk is its size. Reusing one buffer for a
            whole checkpoint keeps the extra memory to that buffer and spares the kernel from handing
            out (and zeroing) fresh pages for every tensor.
        """
        dtype, shape, begin, end = self.entries[key]
        if out.shape != shape:
            raise ValueError(f"{key}: cannot copy {list(shape)} into {list(out.shape)}")
        chunk = len(scratch) - len(scratch) % dtype.itemsize  # whole elements per chunk
        flat = out.view(-1)
        with open(self.path, "rb", buffering=0) as f:
            for start in range(0, end - begin, chunk):
                n = min(chunk, end - begin - start)
                self._read_exactly(f, self.data_start + begin + start, memoryview(scratch.numpy())[:n], key)
                first = start // dtype.itemsize
                flat[first:first + n // dtype.itemsize].copy_(scratch[:n].view(dtype))

    def _read_exactly(self, f, offset, buffer, key):
        """Fill `buffer` from byte `offset` of the open file `f`."""
        f.seek(offset)
        got = 0
        while got < len(buffer):  # a read may return less than asked; only 0 means the file ended
            n = f.readinto(buffer[got:])
            if not n:
                raise self.error(f"{key}: file ended while reading; truncated?")
            got += n


def read_safetensors(path):
    """Every tensor of a .safetensors file as a {name: CPU tensor} dict (small files: checkpoints, caches)."""
    file = SafetensorsFile(path)
    return {key: file.read(key) for key in file.entries}
