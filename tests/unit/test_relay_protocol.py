"""The wire protocol: messages split from any chunking, garbage refused before it costs."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from townsquare.cli import main
from townsquare.relay.protocol import HEADER, Decoder, Kind, ProtocolError, control, frame


@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30))
def test_messages_come_out_whole_however_the_stream_is_cut(cuts: list[int]) -> None:
    sent = [control(Kind.HELLO, {"ticket": "t"})] + [frame(i, i * 10, b"x" * i) for i in range(8)]
    stream = b"".join(sent)
    decoder, received, offset = Decoder(), [], 0
    for size in cuts * (len(stream) // sum(cuts) + 1):
        received += decoder.feed(stream[offset : offset + size])
        offset += size
        if offset >= len(stream):
            break
    assert [m.raw for m in received] == sent
    assert [m.frame_header() for m in received[1:]] == [(i, i * 10) for i in range(8)]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (HEADER.pack(5, 99) + b"xxxx", "unknown message type 99"),
        (HEADER.pack(1 << 20, Kind.HELLO), "length 1048576 out of range"),
        (HEADER.pack(0, Kind.HELLO), "length 0 out of range"),
        (HEADER.pack(1 << 20, Kind.FRAME), "length 1048576 out of range"),
    ],
)
def test_garbage_is_refused_with_what_was_wrong(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        Decoder().feed(data, control_only=True)


def test_a_hello_that_is_not_a_json_object_says_so() -> None:
    (message,) = Decoder().feed(HEADER.pack(3, Kind.HELLO) + b"[]")
    with pytest.raises(ProtocolError, match="not a JSON object"):
        message.fields()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["relay", "--namespace", "n", "--room", "r", "--pod", "r-relay-0",
          "--origin", "127.0.0.1:1"], "--ticket-key-file: needed"),
        (["relay", "--namespace", "n", "--room", "r", "--pod", "r-relay-0",
          "--origin", "nowhere:x", "--ticket-key-file", "/dev/null"],
         "--ticket-key-file: ticket key"),
        (["origin", "--room", "r", "--ticket-key-file", "/dev/null"], "--namespace and --room"),
        (["relay", "--namespace", "n", "--room", "r", "--pod", "r-relay-0",
          "--origin", "127.0.0.1:1", "--ticket-key-file", "KEY"], "--map-file: needed"),
        (["relay", "--kubeconfig", "/etc/kubeconfig"], "unrecognized arguments: --kubeconfig"),
    ],
)  # fmt: skip
def test_relay_and_origin_refuse_bad_options_in_one_line(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    for name in ("POD_NAMESPACE", "TOWNSQUARE_TICKET_KEY_FILE", "TOWNSQUARE_ROOM",
                 "TOWNSQUARE_MAP_FILE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    key = tmp_path / "key"
    key.write_bytes(b"k" * 32)
    argv = [str(key) if arg == "KEY" else arg for arg in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
