"""The model's tokenizer for the mesh: ChatTokenizer (encode, chat template, decode) and streaming detokenization."""

from moemesh.tokenization.chat_template import ChatTemplate, ChatTemplateError
from moemesh.tokenization.chat_tokenizer import ChatTokenizer, TokenPiece
from moemesh.tokenization.detokenizer import IncrementalDetokenizer

__all__ = ["ChatTemplate", "ChatTemplateError", "ChatTokenizer", "IncrementalDetokenizer", "TokenPiece"]
