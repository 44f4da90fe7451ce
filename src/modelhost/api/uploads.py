"""Multipart uploads (audio): streamed to a file on disk under a size limit, parsed on the
way only for their small form fields, then relayed to the worker byte for byte.

The gateway needs the `model` field to route, and a few others to validate; the audio itself
is only counted. A body larger than the limit is refused as soon as it crosses it (413),
whether or not it declared a Content-Length, so memory stays flat whatever is sent.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from modelhost.errors import InvalidRequest, RequestTooLarge

FIELD_LIMIT = 64 * 1024  # bytes kept of one non-file field


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
    """python-multipart callbacks: keep the small fields, count the files' bytes."""

    def __init__(self, upload: Upload) -> None:
        self.upload = upload
        self._header_name = b""
        self._header_value = b""
        self._name = ""
        self._filename: str | None = None
        self._data = bytearray()

    def on_part_begin(self) -> None:
        self._name, self._filename, self._data = "", None, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
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


def extract_file(upload: Upload, name: str = "file") -> IO[bytes]:
    """The content of one file field, copied to its own named temporary file (for a request
    the gateway must re-send in another shape, such as `diarize=true`); deleted when closed."""
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

    parser = MultipartParser(params[b"boundary"], {
        "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    })
    upload.body.seek(0)
    while chunk := upload.body.read(1 << 20):
        parser.write(chunk)
    parser.finalize()
    upload.body.seek(0)
    out.seek(0)
    return out


async def spool_multipart(request: Request, limit: int, spool_dir: Path | None = None
                          ) -> Upload:
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
    collector = _FieldCollector(upload)
    parser = MultipartParser(boundary, {
        "on_part_begin": collector.on_part_begin,
        "on_header_field": collector.on_header_field,
        "on_header_value": collector.on_header_value,
        "on_header_end": collector.on_header_end,
        "on_part_data": collector.on_part_data,
        "on_part_end": collector.on_part_end,
    })
    try:
        async for chunk in request.stream():
            upload.size += len(chunk)
            if upload.size > limit:
                raise RequestTooLarge(f"Upload exceeds the limit of {limit} bytes.")
            body.write(chunk)
            parser.write(chunk)
        parser.finalize()
    except (RequestTooLarge, InvalidRequest):
        body.close()
        raise
    except Exception as exc:  # python-multipart raises its own errors on malformed bodies
        body.close()
        raise InvalidRequest(f"The multipart body could not be parsed: {exc}",
                             param="file") from None
    body.seek(0)
    return upload
