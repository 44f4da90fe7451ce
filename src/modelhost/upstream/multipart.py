"""What a request to a worker carries: bytes, a file, or a multipart form the gateway composes.

A bytes body goes out with the request's head in a single `transport.write`; a file and the
file of a `Multipart` form (an audio upload, spooled to disk) are streamed from disk with
back-pressure (`connection._send`). The length is known before sending (`_length`), so every
request has a Content-Length and none is chunked.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO


@dataclass
class Multipart:
    """A multipart/form-data body the gateway composes: text fields and one file, streamed
    from disk when sent."""

    fields: list[tuple[str, str]] = field(default_factory=list)
    file_field: str = "file"
    file_path: Path | None = None
    filename: str = "file"
    file_type: str = "application/octet-stream"
    boundary: str = field(default_factory=lambda: "modelhost-" + secrets.token_hex(12))

    def add(self, name: str, value: str) -> None:
        self.fields.append((name, value))

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def _pieces(self) -> tuple[bytes, bytes]:
        """The bytes before and after the file's content."""
        head = bytearray()
        for name, value in self.fields:
            head += (f"--{self.boundary}\r\nContent-Disposition: form-data; "
                     f"name=\"{_quote(name)}\"\r\n\r\n").encode() + value.encode() + b"\r\n"
        tail = f"--{self.boundary}--\r\n".encode()
        if self.file_path is None:
            return bytes(head), tail
        head += (f"--{self.boundary}\r\nContent-Disposition: form-data; "
                 f"name=\"{_quote(self.file_field)}\"; filename=\"{_quote(self.filename)}\"\r\n"
                 f"Content-Type: {self.file_type}\r\n\r\n").encode()
        return bytes(head), b"\r\n" + tail


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace(
        "\n", "%0A")


Body = bytes | IO[bytes] | Multipart


def _length(body: Body) -> int:
    if isinstance(body, bytes):
        return len(body)
    if isinstance(body, Multipart):
        before, after = body._pieces()
        size = os.stat(body.file_path).st_size if body.file_path is not None else 0
        return len(before) + size + len(after)
    position = body.seek(0, os.SEEK_END)
    body.seek(0)
    return position
