"""What a path on the command line is: its format, its files, and a content fingerprint.

One pre-pass per file hashes the bytes (for idempotent re-ingest) and checks they are UTF-8, so that
every reader can assume valid text and every encoding error names the file and the line. A file ending in
`.gz`, `.bz2` or `.xz` (the usual form of RDF dumps) is read through the standard library's decompressor,
streamed, never written out uncompressed; its fingerprint is that of the content, so `world.ttl` and
`world.ttl.gz` are one source.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import hashlib
import io
import lzma
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kalmkg.errors import KalmkgError

# --format name -> canonical format
RDF_FORMATS = {
    "turtle": "turtle", "ttl": "turtle",
    "nt": "ntriples", "ntriples": "ntriples", "n-triples": "ntriples",
    "nq": "nquads", "nquads": "nquads", "n-quads": "nquads",
    "trig": "trig",
    "xml": "rdfxml", "rdf": "rdfxml", "rdfxml": "rdfxml", "rdf/xml": "rdfxml", "owl": "rdfxml",
    "jsonld": "jsonld", "json-ld": "jsonld",
}
DELIMITED_FORMATS = {"tsv": "tsv", "csv": "csv", "txt": "tsv"}
SUPPORTED = "turtle (.ttl), ntriples (.nt), nquads (.nq), trig (.trig), rdfxml (.rdf/.owl/.xml), " \
            "jsonld (.jsonld), tsv (.tsv/.txt), csv (.csv), or a folder of TSV files; any file may be " \
            "compressed (.gz, .bz2, .xz)"
COMPRESSIONS = {".gz": "gz", ".bz2": "bz2", ".xz": "xz"}
_UNSUPPORTED_COMPRESSIONS = (".zst", ".zip", ".7z", ".lz4", ".br")
# what the decompressors raise on corrupt or truncated data (gzip: zlib.error, EOFError; bz2: OSError)
DECOMPRESSION_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error)


def broken_archive(compression: str | None) -> tuple:
    """The exceptions that mean a corrupt compressed file, for `except`; none for a plain file (whose
    OSError is something else: a remote JSON-LD context, a permission)."""
    return DECOMPRESSION_ERRORS if compression else ()

_EXTENSIONS = {
    ".ttl": "turtle", ".turtle": "turtle", ".nt": "ntriples", ".ntriples": "ntriples", ".nq": "nquads",
    ".nquads": "nquads", ".trig": "trig", ".rdf": "rdfxml", ".owl": "rdfxml", ".xml": "rdfxml",
    ".jsonld": "jsonld", ".json": "jsonld", ".tsv": "tsv", ".txt": "tsv", ".csv": "csv",
}

# Triple files of a benchmark folder and the split each one holds (KG-BERT layout and ours).
SPLIT_FILES = {"train.tsv": "train", "triples.tsv": "train", "dev.tsv": "valid", "valid.tsv": "valid",
               "test.tsv": "test"}
# Text files: (target, role). role 'text' = `id<TAB>text`; 'long' = a long description only.
TEXT_FILES = {"entity2text.txt": ("entity", "text"), "entity2textlong.txt": ("entity", "long"),
              "entities.tsv": ("entity", "text"), "relation2text.txt": ("relation", "text"),
              "relations.tsv": ("relation", "text")}


@dataclass
class SourceFile:
    path: Path
    kind: str  # 'rdf', 'triples', 'text'
    format: str  # canonical RDF format, or 'tsv' / 'csv'
    split: str = "train"
    target: str = "entity"  # text files: 'entity' or 'relation'
    role: str = "text"
    size: int = 0  # bytes on disk (compressed, for a compressed file)
    compression: str | None = None  # 'gz', 'bz2', 'xz'


@dataclass
class Source:
    """One argument of `kalmkg ingest`: a file, or a folder of TSV files read as one graph."""

    name: str
    format: str
    files: list[SourceFile] = field(default_factory=list)
    sha256: str = ""

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def _text_role(name: str) -> tuple[str, str] | None:
    lower = name.lower()
    if lower in TEXT_FILES:
        return TEXT_FILES[lower]
    if lower.startswith("entity2text") or lower.startswith("entities."):
        return ("entity", "long" if "long" in lower else "text")
    if lower.startswith("relation2text") or lower.startswith("relations."):
        return ("relation", "text")
    return None


def split_compression(path: Path) -> tuple[str | None, str]:
    """(compression, the file's name under it): `world.ttl.gz` -> ('gz', 'world.ttl'), `world.ttl` ->
    (None, 'world.ttl'); raises KalmkgError for a compression that is not streamed."""
    suffix = path.suffix.lower()
    if suffix in _UNSUPPORTED_COMPRESSIONS:
        raise KalmkgError(f"{path}: {suffix} files are not read; decompress it, or compress it as .gz, .bz2 or .xz")
    if suffix in COMPRESSIONS:
        return COMPRESSIONS[suffix], path.stem
    return None, path.name


def resolve_source(path: Path, fmt: str | None = None, split: str = "train") -> Source:
    """Classify a path; raises KalmkgError for a missing path or an unknown format."""
    if not path.exists():
        raise KalmkgError(f"{path}: no such file or folder")
    if path.is_dir():
        return _folder_source(path)
    compression, name = split_compression(path)
    suffix = Path(name).suffix.lower()
    if fmt is not None:
        canonical = RDF_FORMATS.get(fmt.lower()) or DELIMITED_FORMATS.get(fmt.lower())
        if canonical is None:
            raise KalmkgError(f"unknown format '{fmt}'; supported: {SUPPORTED}")
    else:
        canonical = _EXTENSIONS.get(suffix)
        if canonical is None:
            raise KalmkgError(
                f"{path}: cannot tell the format from the extension '{suffix or path.suffix}'; "
                f"pass --format, one of: {SUPPORTED}"
            )
    if canonical in ("tsv", "csv"):
        role = _text_role(name)
        if role is not None:
            file = SourceFile(path, "text", canonical, target=role[0], role=role[1], compression=compression)
        else:
            file = SourceFile(path, "triples", canonical, split=split, compression=compression)
    else:
        file = SourceFile(path, "rdf", canonical, compression=compression)
    return Source(str(path), canonical, [file])


def _folder_source(path: Path) -> Source:
    files: list[SourceFile] = []
    for child in sorted(path.iterdir()):
        if not child.is_file():
            continue
        if child.suffix.lower() in _UNSUPPORTED_COMPRESSIONS:
            continue  # a folder's other files (a .zip of something) are not the graph's
        compression, name = split_compression(child)
        name = name.lower()
        if name in SPLIT_FILES:
            files.append(SourceFile(child, "triples", "tsv", split=SPLIT_FILES[name], compression=compression))
        elif (role := _text_role(name)) is not None:
            files.append(SourceFile(child, "text", "tsv", target=role[0], role=role[1], compression=compression))
    if not any(f.kind == "triples" for f in files):
        raise KalmkgError(
            f"{path}: a folder must hold train.tsv (and optionally dev.tsv, test.tsv, entity2text.txt, "
            "relation2text.txt) or triples.tsv"
        )
    return Source(str(path), "tsv-folder", files)


def fingerprint(source: Source, on_bytes: Callable[[int], None] | None = None) -> None:
    """Hash the source's files and check they are non-empty UTF-8; fills `sha256` and sizes."""
    total = hashlib.sha256()
    for f in source.files:
        # an RDF file of nothing but whitespace is a valid, empty graph; an empty TSV file is a mistake
        digest, f.size = _check_file(f.path, on_bytes, f.compression, blank_ok=f.kind == "rdf")
        # Content and role only: a renamed copy of a file is the same source.
        total.update(f"{f.kind}\0{f.split}\0{f.target}\0{f.role}\0{digest}\n".encode())
    source.sha256 = total.hexdigest()


def _check_file(path: Path, on_bytes: Callable[[int], None] | None,
                compression: str | None = None, blank_ok: bool = False) -> tuple[str, int]:
    """(sha256 of the content, bytes on disk); the content is checked to be non-blank UTF-8."""
    h = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")()
    nonblank = False
    lines_before = 0
    with open_source(path, compression, on_bytes) as fh:
        try:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    line = lines_before + chunk.count(b"\n", 0, exc.start) + 1
                    raise KalmkgError(f"{path}:{line}: not valid UTF-8 (byte 0x{chunk[exc.start]:02x})") from None
                lines_before += chunk.count(b"\n")
                nonblank = nonblank or bool(chunk.strip())
        except broken_archive(compression) as exc:
            raise KalmkgError(f"{path}: cannot decompress: {' '.join(str(exc).split())}") from None
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise KalmkgError(f"{path}:{lines_before + 1}: not valid UTF-8 (truncated character at the end)") from None
    if not nonblank and not blank_ok:
        raise KalmkgError(f"{path}: file is empty")
    return h.hexdigest(), path.stat().st_size


class CountingReader(io.RawIOBase):
    """A binary file that reports how many bytes were read, for progress bars over streaming parsers."""

    def __init__(self, path: Path, on_bytes: Callable[[int], None] | None):
        self._fh = open(path, "rb")
        self._on_bytes = on_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._fh.readinto(buffer)
        if n and self._on_bytes:
            self._on_bytes(n)
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


class _Decompressed(io.RawIOBase):
    """A decompressing reader that also closes the file under it (the standard library's leave it open)."""

    def __init__(self, inner, raw: io.RawIOBase):
        self._inner, self._raw = inner, raw

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self._inner.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self._inner.close()
            self._raw.close()
        super().close()


_OPENERS = {"gz": lambda f: gzip.GzipFile(fileobj=f, mode="rb"), "bz2": lambda f: bz2.BZ2File(f, "rb"),
            "xz": lambda f: lzma.LZMAFile(f, "rb")}


def open_source(path: Path, compression: str | None, on_bytes: Callable[[int], None] | None = None) -> io.RawIOBase:
    """A binary reader of a file's content, decompressed as it is read; `on_bytes` counts the bytes read
    from disk (the progress bar's total is the size on disk)."""
    raw = CountingReader(path, on_bytes)
    if compression is None:
        return raw
    # a large buffer under the decompressor: the parsers above read in small pieces
    return _Decompressed(_OPENERS[compression](io.BufferedReader(raw, 1 << 20)), raw)
