"""shm_region's signalling helpers: the bounded polls of a header word (spin_while / spin_until) and the kernel
socket timeouts (set_timeout) that recv_message reports as TimeoutError."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from moemesh.serving import shm_region


@pytest.fixture()
def region(tmp_path):
    layout = shm_region.Layout(max_tokens=4, hidden_size=8, top_k=2, dtype="float32")
    region = shm_region.Region(tmp_path / "region", layout, create=True)
    yield region
    region.unlink()


def _write_later(words, index: int, value: int, delay_s: float) -> threading.Thread:
    def run() -> None:
        time.sleep(delay_s)
        words[index] = value

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_spin_while_returns_once_the_word_moves_and_gives_up_after_its_window(region):
    words = region.beats
    assert shm_region.spin_while(words, shm_region.REQUEST_WORD, 5, 0.5)  # already different: at once
    words[shm_region.REQUEST_WORD] = 5
    start = time.perf_counter()
    assert not shm_region.spin_while(words, shm_region.REQUEST_WORD, 5, 0.02)
    assert 0.02 <= time.perf_counter() - start < 1.0
    writer = _write_later(words, shm_region.REQUEST_WORD, 6, 0.01)
    assert shm_region.spin_while(words, shm_region.REQUEST_WORD, 5, 5.0)
    writer.join()
    assert int(words[shm_region.REQUEST_WORD]) == 6


def test_spin_until_waits_for_the_exact_value(region):
    words = region.beats
    start = time.perf_counter()
    assert not shm_region.spin_until(words, shm_region.REPLY_WORD, 3, 0.02)  # the word is 0
    assert time.perf_counter() - start >= 0.02
    writer = _write_later(words, shm_region.REPLY_WORD, 3, 0.01)
    assert shm_region.spin_until(words, shm_region.REPLY_WORD, 3, 5.0)
    writer.join()


def test_set_timeout_makes_recv_message_time_out_and_still_deliver():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        shm_region.set_timeout(b, 0.05)
        start = time.perf_counter()
        with pytest.raises(TimeoutError):
            shm_region.recv_message(b)
        assert 0.04 <= time.perf_counter() - start < 2.0
        shm_region.send_message(a, 7, 3, 1, 0, "traceparent=x")
        assert shm_region.recv_message(b) == (7, 3, 1, 0, "traceparent=x")
        shm_region.set_timeout(b, None)  # blocking again: a closed peer is EOF, not a timeout
        a.close()
        assert shm_region.recv_message(b) is None
