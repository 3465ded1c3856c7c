"""`python -m gateway` / `moemesh-gateway`: the public Chat API process."""

from __future__ import annotations

from gateway.account import MeteringAccount
from gateway.batcher_pool import pool_from_addresses
from gateway.closing import Closing
from gateway.completion import Completions
from gateway.config import GatewayConfig
from gateway.metering_client import LocalMetering, MeteringClient
from gateway.models import ModelCatalog
from gateway.servicer import ChatServicer, add_to_server
from gateway.upstream import BATCHER_CHANNEL_OPTIONS, TokenizerClient
from moemesh.serving import client_channel, run_service
from moemesh.serving.server import exit_now


def main(argv: list[str] | None = None) -> None:
    config = GatewayConfig.load(argv)
    channels = []
    completions: list[Completions] = []
    closing = Closing()  # on_drain: open streams end in-band before the grace is over (gateway/closing.py)

    def register(server):
        tokenizer = client_channel(config.tokenizer_addr)
        batcher_channels = [client_channel(a, BATCHER_CHANNEL_OPTIONS) for a in config.batcher_addrs]  # backpressure
        channels.extend([tokenizer, *batcher_channels])
        by_address = dict(zip(config.batcher_addrs, batcher_channels))
        batcher = pool_from_addresses(config.batcher_addrs, by_address.__getitem__)  # several: a pool
        account = None
        if config.auth:
            metering_channel = client_channel(config.metering_addr)
            channels.append(metering_channel)
            metering = MeteringClient(metering_channel, cache_seconds=config.auth_cache_seconds)
            account = MeteringAccount(metering_channel)
        else:
            metering = LocalMetering()
        completions.append(Completions(TokenizerClient(tokenizer), batcher, metering))
        catalog = ModelCatalog([config.model], backend=config.backend)
        servicer = ChatServicer(completions[0], catalog, metering, auth=config.auth,
                                default_max_tokens=config.default_max_tokens, request_timeout=config.request_timeout,
                                account=account, closing=closing, max_n=config.max_n)
        return add_to_server(servicer, server)

    async def on_stop() -> None:
        for c in completions:
            await c.drain()
        for channel in channels:
            await channel.close()

    exit_now(run_service(config, register, name="gateway", on_stop=on_stop, on_drain=closing.begin))


if __name__ == "__main__":
    main()
