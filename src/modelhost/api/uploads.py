"""Multipart uploads (audio): streamed to a file on disk under a size limit, parsed on the
way only for their small form fields, then relayed to the worker byte for byte.

The gateway needs the `model` field to route, and a few others to validate; the audio itself
is only counted. Every limit answers 413 (RequestTooLarge) as soon as it is crossed, and the
spool file (unlinked from the start) is closed, so nothing stays on disk or in memory:

- the body's size (`limit`), whether or not it declared a Content-Length;
- the number of parts (`max_parts`);
- the bytes of headers of one part (`max_part_header_bytes`).

Receiving the body and writing it to the spool file is cheap and stays on the event loop; the
parser (python-multipart, pure Python: a body of 25 MiB of tiny parts is seconds of CPU) runs
in a worker thread, fed in batches as the body arrives (`_Feeder`), so that it never stalls the
gateway's other requests. `extract_file` reads the whole spool: call it through
`asyncio.to_thread` (as `extract_file_async` does).
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from modelhost.errors import InvalidRequest, RequestTooLarge

FIELD_LIMIT = 64 * 1024  # bytes kept of one non-file field
MAX_PARTS = 64
MAX_PART_HEADER_BYTES = 16 * 1024
# The parser runs in a thread once this much body is waiting (and at the end): a typical
# upload of a few hundred KiB is parsed in one or two hops, and a part or header limit is
# seen at most this far past where it was crossed.
BATCH_BYTES = 256 * 1024
# Within a batch the parser is fed this much at a time, so that a limit is seen (and parsing
# stops) within this many bytes of where it was crossed.
SLICE_BYTES = 64 * 1024


@dataclass
class Upload:
    """A spooled multipart body: `body` (rewound) holds it exactly as the client sent it."""

    body: IO[bytes]
    content_type: str
    size: int
    fields: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)  # field name -> bytes
    filenames: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> str | None:
        values = self.fields.get(name)
        return values[-1] if values else None

    def close(self) -> None:
        self.body.close()


class _FieldCollector:
    """python-multipart callbacks: keep the small fields, count the files' bytes, and refuse
    (RequestTooLarge, raised out of `parser.write`) more than `max_parts` parts or more than
    `max_header_bytes` of headers in one part."""

    def __init__(self, upload: Upload, max_parts: int = MAX_PARTS,
                 max_header_bytes: int = MAX_PART_HEADER_BYTES) -> None:
        self.upload = upload
        self.max_parts = max_parts
        self.max_header_bytes = max_header_bytes
        self.parts = 0
        self._header_bytes = 0
        self._header_name = b""
        self._header_value = b""
        self._name = ""
        self._filename: str | None = None
        self._data = bytearray()

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > self.max_parts:
            raise RequestTooLarge(f"The multipart body has more than {self.max_parts} parts "
                                  "(the limit).")
        self._name, self._filename, self._data = "", None, bytearray()
        self._header_bytes = 0

    def _count_header(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.max_header_bytes:
            raise part_header_too_large(self.max_header_bytes)

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            _, params = parse_options_header(self._header_value)
            self._name = params.get(b"name", b"").decode("utf-8", "replace")
            if b"filename" in params:
                self._filename = params[b"filename"].decode("utf-8", "replace")
        self._header_name, self._header_value = b"", b""

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._filename is not None:
            files = self.upload.files
            files[self._name] = files.get(self._name, 0) + (end - start)
        elif len(self._data) < FIELD_LIMIT:
            self._data += data[start:end]

    def on_part_end(self) -> None:
        if self._filename is not None:
            self.upload.files.setdefault(self._name, 0)
            self.upload.filenames[self._name] = self._filename
        else:
            value = self._data[:FIELD_LIMIT].decode("utf-8", "replace")
            self.upload.fields.setdefault(self._name, []).append(value)


def part_header_too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"A part of the multipart body has more than {limit} bytes of "
                           "headers (the limit).")


def new_parser(boundary: bytes, callbacks: dict[str, Any],
               max_part_header_bytes: int = MAX_PART_HEADER_BYTES) -> MultipartParser:
    # python-multipart bounds a single header line itself (4 KiB by default, a 400): ours is
    # the per-part total, so its limits are raised to ours (and answered 413).
    return MultipartParser(boundary, callbacks,  # type: ignore[arg-type]
                           max_header_size=max_part_header_bytes,
                           max_header_count=max(8, max_part_header_bytes // 256))


async def extract_file_async(upload: Upload, name: str = "file") -> IO[bytes]:
    """`extract_file` in a worker thread: it reads and parses the whole spool."""
    return await asyncio.to_thread(extract_file, upload, name)


def extract_file(upload: Upload, name: str = "file") -> IO[bytes]:
    """The content of one file field, copied to its own named temporary file (for a request
    the gateway must re-send in another shape, such as `diarize=true`); deleted when closed.
    Blocking (it reads and parses the whole spool): from async code, `extract_file_async`."""
    _, params = parse_options_header(upload.content_type)
    out = tempfile.NamedTemporaryFile(prefix="modelhost-audio-")  # noqa: SIM115
    state = {"file": False}
    header = {"name": b"", "value": b""}

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["name"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] += data[start:end]

    def on_header_end() -> None:
        if header["name"].lower() == b"content-disposition":
            _, disposition = parse_options_header(header["value"])
            state["file"] = disposition.get(b"name") == name.encode() and \
                b"filename" in disposition
        header["name"], header["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["file"]:
            out.write(data[start:end])

    def on_part_end() -> None:
        state["file"] = False

    # The spool was parsed once under the limits already: its header lines fit any limit.
    parser = new_parser(params[b"boundary"], {
        "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }, max_part_header_bytes=max(MAX_PART_HEADER_BYTES, upload.size))
    try:
        upload.body.seek(0)
        while chunk := upload.body.read(1 << 20):
            parser.write(chunk)
        parser.finalize()
        upload.body.seek(0)
        out.seek(0)
    except BaseException:
        out.close()
        raise
    return out


class _Feeder:
    """Feeds the parser in a worker thread: chunks wait here until BATCH_BYTES of them (or
    the end of the body), then one `asyncio.to_thread` hop parses them, SLICE_BYTES at a time.
    The parser and its callbacks are only ever used by one thread at a time (each hop is
    awaited before the next)."""

    def __init__(self, parser: MultipartParser) -> None:
        self.parser = parser
        self.pending: list[bytes] = []
        self.pending_bytes = 0

    async def add(self, chunk: bytes) -> None:
        self.pending.append(chunk)
        self.pending_bytes += len(chunk)
        if self.pending_bytes >= BATCH_BYTES:
            await self._flush(final=False)

    async def finish(self) -> None:
        await self._flush(final=True)

    async def _flush(self, final: bool) -> None:
        chunks, self.pending, self.pending_bytes = self.pending, [], 0
        await asyncio.to_thread(self._parse, chunks, final)

    def _parse(self, chunks: list[bytes], final: bool) -> None:
        write = self.parser.write
        for chunk in chunks:
            if len(chunk) <= SLICE_BYTES:
                write(chunk)
                continue
            view = memoryview(chunk)
            for start in range(0, len(chunk), SLICE_BYTES):
                write(bytes(view[start:start + SLICE_BYTES]))
        if final:
            self.parser.finalize()


async def spool_multipart(request: Request, limit: int, spool_dir: Path | None = None,
                          max_parts: int = MAX_PARTS,
                          max_part_header_bytes: int = MAX_PART_HEADER_BYTES) -> Upload:
    content_type = request.headers.get("content-type", "")
    kind, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise InvalidRequest("This endpoint takes multipart/form-data (a `file` and form "
                             "fields), as the OpenAI API does.", param="file")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"Upload of {declared} bytes exceeds the limit of {limit} "
                              "bytes.")
    # Unlinked at once, so nothing is left behind; Upload.close() closes it.
    body = tempfile.TemporaryFile(dir=spool_dir)  # noqa: SIM115
    upload = Upload(body=body, content_type=content_type, size=0)
    collector = _FieldCollector(upload, max_parts, max_part_header_bytes)
    parser = new_parser(boundary, {
        "on_part_begin": collector.on_part_begin,
        "on_header_field": collector.on_header_field,
        "on_header_value": collector.on_header_value,
        "on_header_end": collector.on_header_end,
        "on_part_data": collector.on_part_data,
        "on_part_end": collector.on_part_end,
    }, max_part_header_bytes)
    feeder = _Feeder(parser)
    try:
        async for chunk in request.stream():
            upload.size += len(chunk)
            if upload.size > limit:
                raise RequestTooLarge(f"Upload exceeds the limit of {limit} bytes.")
            body.write(chunk)
            await feeder.add(chunk)
        await feeder.finish()
    except (RequestTooLarge, InvalidRequest):
        body.close()
        raise
    except MultipartParseError as exc:
        body.close()
        if str(exc).startswith("Maximum header"):  # python-multipart's own header limits
            raise part_header_too_large(max_part_header_bytes) from None
        raise InvalidRequest(f"The multipart body could not be parsed: {exc}",
                             param="file") from None
    except Exception as exc:  # python-multipart's other errors on malformed bodies
        body.close()
        raise InvalidRequest(f"The multipart body could not be parsed: {exc}",
                             param="file") from None
    except BaseException:  # cancelled (the client went away)
        body.close()
        raise
    body.seek(0)
    return upload
