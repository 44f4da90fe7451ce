"""The README's quick-start examples, run as a new user would run them: the Python blocks of
"Quick start", in order, in one namespace, against a gateway serving the built-in models with
no key (the README's `api_key="unused"`), from a folder holding a `meeting.wav` of two voices
made with espeak-ng. A README example that stops working fails here. (Slow: the built-in
chat, speech, embeddings and diarization models.)"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import pytest

from tests.audio import concat_wavs, have_espeak, have_sox, speak
from tests.conftest import Gateway, GatewayFactory

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = pytest.mark.skipif(not (have_espeak() and have_sox()),
                                reason="espeak-ng and sox make the README's meeting.wav")


def quick_start_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: GatewayFactory) -> Gateway:
    return module_gateway_factory(include_builtin=True)


def test_the_quick_start_examples_run(gateway: Gateway, tmp_path: Path) -> None:
    blocks = quick_start_blocks()
    assert len(blocks) >= 2, "the README's quick start has lost its Python examples"
    turns = [speak("Good morning, thanks for joining the meeting today.", tmp_path / "a.wav",
                   voice="en-us+m3", pitch=20),
             speak("Thank you. I have prepared the budget figures for this quarter.",
                   tmp_path / "b.wav", voice="en-us+f3", pitch=80),
             speak("Great, please walk us through the main numbers first.",
                   tmp_path / "c.wav", voice="en-us+m3", pitch=20)]
    concat_wavs(turns, tmp_path / "meeting.wav", gap_seconds=0.6)
    namespace: dict[str, object] = {}
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stdout(out):
            for block in blocks:
                code = block.replace("http://127.0.0.1:8000", gateway.url)
                exec(compile(code, str(README), "exec"), namespace)
    finally:
        os.chdir(cwd)
    printed = out.getvalue()
    assert "smollm2-135m" in printed  # the models listed with their states
    assert "paris" in printed.lower(), printed
    diarized = namespace["diarized"]
    speakers = {segment.speaker for segment in diarized.segments}  # type: ignore[attr-defined]
    assert len(speakers) >= 2, diarized
    vectors = namespace["vectors"]
    assert len(vectors.data) == 2  # type: ignore[attr-defined]
