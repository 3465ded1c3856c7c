"""`python -m services.tokenizer` / `moemesh-tokenizer`: the tokenizer service process."""

from __future__ import annotations

from moemesh.serving import run_service
from moemesh.serving.server import exit_now
from services.tokenizer.catalog import TokenizerCatalog
from services.tokenizer.config import TokenizerConfig
from services.tokenizer.servicer import TokenizerServicer, add_to_server


def main(argv: list[str] | None = None) -> None:
    config = TokenizerConfig.load(argv)

    def register(server):
        catalog = TokenizerCatalog.load(config.models)
        return add_to_server(TokenizerServicer(catalog), server)

    exit_now(run_service(config, register, name="tokenizer"))


if __name__ == "__main__":
    main()
