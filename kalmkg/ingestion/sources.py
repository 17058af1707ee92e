"""What a path on the command line is: its format, its files, and a content fingerprint.

Every file's content is hashed (for idempotent re-ingest) and checked to be UTF-8, so that every reader
can assume valid text and every encoding error names the file and the line. A file ending in `.gz`,
`.bz2` or `.xz` (the usual form of RDF dumps) is read through the standard library's decompressor,
streamed, never written out uncompressed; its fingerprint is that of the content, so `world.ttl` and
`world.ttl.gz` are one source.

Where the check happens: a plain file gets a pre-pass before it is read (`fingerprint`: cheap, and an
unchanged file is skipped without parsing it). A compressed file that oxigraph parses (`streams_once`)
is hashed and checked by the parser's own reads (`ContentCheck` under `open_source`), so it is
decompressed once instead of twice (bzip2 decompresses at some 20 MB/s); its pre-pass hashes only the
compressed bytes on disk (`file_fingerprint`), which the store keeps beside the content's, so the same
file is skipped again without decompressing it, and another compression of an ingested content is
found the same once parsed, and dropped. Its blank nodes are staged under PENDING_TAG and renamed to the
content's tag once it is known, so their keys are those the uncompressed file gets.

A compressed file is decompressed (and checked) in a thread up to 4 MiB ahead of the parser
(`_ReadAhead`): the decompressors and hashlib release the GIL, so on a second core bzip2's 20 MB/s
overlap the parse instead of adding to it.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import hashlib
import io
import lzma
import queue
import threading
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
# what oxigraph's streaming parser reads (the others go through rdflib, which holds a whole document)
OXIGRAPH_FORMATS = ("ntriples", "nquads", "turtle", "trig")
# blank nodes' tag until the content's fingerprint is known: no hex digest, and no IRI starts with "_:"
PENDING_TAG = "~" * 12
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
    sha256: str = ""  # of the content (the files decompressed), set by `fingerprint` or after the reading
    file_sha256: str = ""  # of a compressed file's bytes on disk (`file_fingerprint`), where it streams once

    @property
    def tag(self) -> str:
        """What blank nodes' keys are made stable with: the content's fingerprint, or PENDING_TAG while a
        file that streams once is read (the store renames them once the content is known)."""
        return self.sha256[:12] or PENDING_TAG

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


def blank_prefix(tag: str) -> str:
    """The start of the keys of a source's blank nodes: same content, same keys."""
    return f"_:{tag}:"


def streams_once(source: Source) -> bool:
    """Whether the source is one compressed file oxigraph parses: hashed and checked as it is parsed."""
    return len(source.files) == 1 and source.files[0].kind == "rdf" and \
        source.files[0].format in OXIGRAPH_FORMATS and source.files[0].compression is not None


def fingerprint(source: Source, on_bytes: Callable[[int], None] | None = None) -> None:
    """Hash the source's files and check they are non-empty UTF-8; fills `sha256` and sizes."""
    digests = []
    for f in source.files:
        # an RDF file of nothing but whitespace is a valid, empty graph; an empty TSV file is a mistake
        digest, f.size = _check_file(f.path, on_bytes, f.compression, blank_ok=f.kind == "rdf")
        digests.append(digest)
    source.sha256 = source_digest(source, digests)


def file_fingerprint(source: Source, on_bytes: Callable[[int], None] | None = None) -> None:
    """Hash the source's files as they are on disk (compressed), unchecked; fills `file_sha256` and sizes."""
    digests = []
    for f in source.files:
        h = hashlib.sha256()
        with CountingReader(f.path, on_bytes) as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        f.size = f.path.stat().st_size
        digests.append("file:" + h.hexdigest())
    source.file_sha256 = source_digest(source, digests)


def source_digest(source: Source, digests: list[str]) -> str:
    """A source's fingerprint from its files' digests: content and role only, so a renamed copy of a file
    is the same source."""
    total = hashlib.sha256()
    for f, digest in zip(source.files, digests):
        total.update(f"{f.kind}\0{f.split}\0{f.target}\0{f.role}\0{digest}\n".encode())
    return total.hexdigest()


class ContentCheck:
    """A file's content hashed and checked to be UTF-8 as it passes, in pieces: by the pre-pass, or under
    a parser (`open_source(..., check=)`), whose reads then raise the error that names the line."""

    def __init__(self, path: Path):
        self.path = path
        self.sha = hashlib.sha256()
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.lines = 0  # before the current piece
        self.nonblank = False

    def update(self, chunk: bytes) -> None:
        self.sha.update(chunk)
        held = self.decoder.getstate()[0]  # a character's first bytes from the piece before (no newline)
        try:
            self.decoder.decode(chunk)
        except UnicodeDecodeError as exc:  # its positions count from the held bytes
            data = held + chunk
            line = self.lines + data.count(b"\n", 0, exc.start) + 1
            raise KalmkgError(f"{self.path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x})") from None
        self.lines += chunk.count(b"\n")
        self.nonblank = self.nonblank or bool(chunk.strip())

    def finish(self) -> str:
        """The content's sha256, once every byte has passed."""
        try:
            self.decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise KalmkgError(f"{self.path}:{self.lines + 1}: not valid UTF-8 (truncated character at the end)") from None
        return self.sha.hexdigest()


def _check_file(path: Path, on_bytes: Callable[[int], None] | None,
                compression: str | None = None, blank_ok: bool = False) -> tuple[str, int]:
    """(sha256 of the content, bytes on disk); the content is checked to be non-blank UTF-8."""
    check = ContentCheck(path)
    with open_source(path, compression, on_bytes) as fh:
        try:
            while chunk := fh.read(1 << 22):
                check.update(chunk)
        except broken_archive(compression) as exc:
            raise KalmkgError(f"{path}: cannot decompress: {' '.join(str(exc).split())}") from None
    digest = check.finish()
    if not check.nonblank and not blank_ok:
        raise KalmkgError(f"{path}: file is empty")
    return digest, path.stat().st_size


class CountingReader(io.RawIOBase):
    """A binary file that reports how many bytes were read, for progress bars over streaming parsers."""

    def __init__(self, path: Path, on_bytes: Callable[[int], None] | None):
        self._fh = open(path, "rb")
        self._on_bytes = on_bytes
        self.count = 0  # bytes read so far

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._fh.readinto(buffer)
        self.count += n or 0
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


class _Checked(io.RawIOBase):
    """A reader whose bytes pass through a ContentCheck on their way up."""

    def __init__(self, inner: io.RawIOBase, check: ContentCheck):
        self._inner, self._check = inner, check

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._inner.readinto(buffer)
        if n:
            self._check.update(bytes(memoryview(buffer)[:n]))
        return n

    def close(self) -> None:
        if not self.closed:
            self._inner.close()
        super().close()


class _ReadAhead(io.RawIOBase):
    """A reader filled by a thread that reads the stream under it CHUNK bytes at a time, at most DEPTH
    chunks ahead. A read fills its buffer whole (pyarrow's CSV reader takes each read as one block) unless
    the content ends or an error of the stream under it comes first (a corrupt archive, a check's UTF-8
    error): that error is raised by the read that reaches it, after the bytes before its chunk, and by
    every read after. `on_bytes` is called by the reading caller, never from the thread. Reads after
    `close` raise ValueError, also one already waiting in another thread (pyarrow reads in its own)."""

    CHUNK = 1 << 16  # an error loses at most the bytes decompressed before it in its piece
    DEPTH = 64

    def __init__(self, inner: io.RawIOBase, disk: CountingReader, on_bytes: Callable[[int], None] | None):
        self._inner, self._disk, self._on_bytes = inner, disk, on_bytes
        self._queue: queue.Queue = queue.Queue(self.DEPTH)
        self._stop = threading.Event()
        self._chunk, self._at, self._reported = memoryview(b""), 0, 0
        self._ended, self._error = False, None
        self._thread = threading.Thread(target=self._fill, name="kalmkg-read-ahead", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                chunk = self._inner.read(self.CHUNK) or b""
                self._put((chunk, self._disk.count))
                if not chunk:
                    return
        except BaseException as exc:  # handed to the reader, which raises it where the bytes end
            self._put((exc, self._disk.count))

    def _put(self, item) -> None:
        while not self._stop.is_set():  # a closed reader takes nothing more: give up instead of blocking
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _next(self) -> None:
        """Take the thread's next chunk (or its end, or its error)."""
        while True:
            if self._stop.is_set():
                raise ValueError("read of closed file")
            try:
                item, disk = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                continue
        if self._on_bytes and disk > self._reported:
            self._on_bytes(disk - self._reported)
        self._reported = disk
        if isinstance(item, BaseException):
            self._error = item
        elif not item:
            self._ended = True
        else:
            self._chunk, self._at = memoryview(item), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.closed:
            raise ValueError("read of closed file")
        out = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(out):
            if self._at >= len(self._chunk):
                if self._error is not None:
                    if filled:
                        break
                    raise self._error
                if self._ended:
                    break
                self._next()
                continue
            n = min(len(out) - filled, len(self._chunk) - self._at)
            out[filled:filled + n] = self._chunk[self._at:self._at + n]
            self._at += n
            filled += n
        return filled

    def close(self) -> None:
        if not self.closed:
            self._stop.set()
            self._thread.join()
            self._inner.close()
        super().close()


def open_source(path: Path, compression: str | None, on_bytes: Callable[[int], None] | None = None,
                check: ContentCheck | None = None) -> io.RawIOBase:
    """A binary reader of a file's content, decompressed as it is read; `on_bytes` counts the bytes read
    from disk (the progress bar's total is the size on disk); `check` sees the content as it is read."""
    if compression is None:
        raw = CountingReader(path, on_bytes)
        return raw if check is None else _Checked(raw, check)
    raw = CountingReader(path, None)
    # a large buffer under the decompressor: the parsers above read in small pieces
    reader: io.RawIOBase = _Decompressed(_OPENERS[compression](io.BufferedReader(raw, 1 << 20)), raw)
    return _ReadAhead(reader if check is None else _Checked(reader, check), raw, on_bytes)
