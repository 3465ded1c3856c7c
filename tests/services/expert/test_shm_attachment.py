"""The shard's end of the shared-memory link (services/expert/shm_server.Attachment) driven over a real SOCK_SEQPACKET
pair and a real /dev/shm region, with the tiny MoE's real ExpertBank: every reply carries the bank's output, with and
without the bounded poll for the next request (spin_us), and the header words follow the messages. Also the spin_us
setting: auto by default, which spins only where a core stays free for the router."""

from __future__ import annotations

import socket
import time

import pytest
import torch

from moemesh.runtime.experts import ExpertBank
from moemesh.serving import shm_region
from moemesh.serving.config import ConfigError
from services.expert.config import ExpertConfig
from services.expert.shard import ExpertShard
from services.expert.shm_server import Attachment

H, K = 64, 2  # the tiny MoE: hidden 64, top-2 of 4 experts


@pytest.fixture(scope="module")
def bank(tiny_moe_dir):
    return ExpertBank.load(tiny_moe_dir, experts=(0, 1))  # shard 0 of 2


def _request(region, sock, seq: int, layer: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens = 1 + seed % 3
    hidden = torch.randn(tokens, H, generator=g)
    ids = torch.stack([torch.randperm(4, generator=g)[:K] for _ in range(tokens)]).to(torch.int32)  # [T, K]
    weights = torch.softmax(torch.randn(tokens, K, generator=g), -1)
    rows = region.rows(tokens)
    rows[0].copy_(hidden), rows[1].copy_(ids), rows[2].copy_(weights)
    shm_region.send_message(sock, seq, layer, tokens)
    region.beats[shm_region.REQUEST_WORD] = seq  # as ShmLink.signal: after the message
    return hidden, ids, weights


@pytest.mark.parametrize("spin_s", [0.0, 0.05])
def test_every_reply_is_the_banks_output_with_or_without_polling(bank, tmp_path, spin_s):
    shard = ExpertShard(bank, hidden_size=H, num_experts=4, dtype=torch.float32, device=torch.device("cpu"))
    layout = shm_region.Layout(max_tokens=4, hidden_size=H, top_k=K, dtype="float32")
    router_region = shm_region.Region(tmp_path / "r", layout, create=True)
    shard_region = shm_region.Region(tmp_path / "r", layout, create=False)  # the shard's own mapping
    router_region.unlink()
    router, shard_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    attachment = Attachment(shard, shard_region, shard_end, "t", spin_s=spin_s)
    try:
        shm_region.set_timeout(router, 10.0)
        with torch.inference_mode():
            for seq in range(1, 7):  # back to back: with spin_s the shard is still polling when most arrive
                layer = seq % 2
                hidden, ids, weights = _request(router_region, router, seq, layer, seq)
                got_seq, got_layer, tokens, status, text = shm_region.recv_message(router)
                assert (got_seq, got_layer, tokens, status, text) == (seq, layer, hidden.shape[0], 0, "")
                assert shm_region.spin_until(router_region.beats, shm_region.REPLY_WORD, seq, 5.0)
                torch.testing.assert_close(router_region.rows(tokens)[3], bank.forward(layer, hidden, ids, weights),
                                           rtol=1e-5, atol=1e-6)
            _request(router_region, router, 7, 9, 0)  # a layer the bank does not host: status 1 naming it
            seq, _, _, status, text = shm_region.recv_message(router)
            assert (seq, status) == (7, 1) and "layer 9" in text
    finally:
        router.close()  # the serving thread sees EOF and ends the attachment
    deadline = time.monotonic() + 10
    while attachment.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not attachment.alive


def test_spin_us_auto_leaves_a_core_for_the_router():
    def config(**kw) -> ExpertConfig:
        return ExpertConfig(num_shards=2, **kw)

    assert config(shard_index=0).spin_seconds(cores=2) == ExpertConfig.SPIN_AUTO_US / 1e6  # auto by default
    assert config(shard_index=0, spin_us=-1).spin_seconds(cores=2) == ExpertConfig.SPIN_AUTO_US / 1e6
    assert config(shard_index=1, spin_us=-1).spin_seconds(cores=2) == 0.0  # router + shard 0 fill 2 cores
    assert config(shard_index=1, spin_us=-1).spin_seconds(cores=4) > 0.0
    assert config(shard_index=0, spin_us=-1).spin_seconds(cores=1) == 0.0
    assert config(shard_index=0, spin_us=-1, device="cuda").spin_seconds(cores=8) == 0.0
    assert config(shard_index=1, spin_us=300).spin_seconds(cores=2) == 300e-6
    assert config(shard_index=0, spin_us=0).spin_seconds(cores=8) == 0.0
    with pytest.raises(ConfigError, match="SPIN_US: -5 must be >= 0"):
        config(spin_us=-5).validate()
