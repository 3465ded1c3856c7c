"""Clients of the edge used by several test modules: openai (sync, async) and raw HTTPS, trusting the dev CA."""

from __future__ import annotations

from pathlib import Path

import httpx2
import openai

from edge_fake_chat import GOOD_KEY
from moemesh.edge import EdgeProcess


def ca_cert(home: Path) -> str:
    return str(home / "certs" / "ca.pem")


def openai_client(edge: EdgeProcess, home: Path, key: str = GOOD_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{edge.url}/v1", api_key=key, max_retries=0, timeout=30,
                         http_client=openai.DefaultHttpxClient(verify=ca_cert(home)))


def async_openai_client(edge: EdgeProcess, home: Path, key: str = GOOD_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{edge.url}/v1", api_key=key, max_retries=0, timeout=30,
                              http_client=openai.DefaultAsyncHttpxClient(verify=ca_cert(home)))


def http_client(home: Path, **kwargs) -> httpx2.Client:
    """A raw HTTPS client trusting the development CA (HTTP/1.1 unless http2=True)."""
    return httpx2.Client(verify=ca_cert(home), timeout=30, **kwargs)
