"""Frames between the loop and a worker (`meterline.pipes`): what one side writes, the
other reads whole."""

import os
import threading
from multiprocessing import Pipe

from meterline.pipes import FrameReader, header


def frames_of(chunks: list[bytes]) -> tuple[list[bytes], list[bool]]:
    frames: list[bytes] = []
    lost: list[bool] = []
    reader = FrameReader(frames.append, lambda: lost.append(True))
    for chunk in chunks:
        reader.data_received(chunk)
    return frames, lost


def test_frames_arriving_in_pieces_are_each_read_whole_and_in_order() -> None:
    payloads = [b"a" * 70_000, b"", b"bc", os.urandom(1000)]
    stream = b"".join(header(len(p)) + p for p in payloads)
    for cut in (1, 3, 4096, 65_536):
        chunks = [stream[i:i + cut] for i in range(0, len(stream), cut)]
        assert frames_of(chunks)[0] == payloads


def test_several_frames_in_one_read_are_all_read() -> None:
    stream = b"".join(header(1) + bytes([i]) for i in range(5))
    assert frames_of([stream])[0] == [bytes([i]) for i in range(5)]


def test_a_frame_written_with_a_header_is_read_by_a_multiprocessing_connection() -> None:
    # the worker reads and writes with a Connection: the framing must be its own
    reading, writing = Pipe(duplex=False)
    payload = b"x" * 100_000  # more than the pipe holds: written while it is read
    writer = threading.Thread(target=lambda: (
        os.write(writing.fileno(), header(len(payload)) + payload[:1000]),
        os.write(writing.fileno(), payload[1000:])))
    writer.start()
    assert reading.recv_bytes() == payload
    writer.join()


def test_a_frame_a_connection_wrote_is_read_by_the_frame_reader() -> None:
    reading, writing = Pipe(duplex=False)
    writing.send_bytes(b"result")
    assert frames_of([os.read(reading.fileno(), 100)])[0] == [b"result"]


def test_the_pipe_closing_is_reported() -> None:
    lost: list[bool] = []
    FrameReader(lambda _: None, lambda: lost.append(True)).connection_lost(None)
    assert lost == [True]
