"""The tokenizer service: moemesh.v1.Tokenizer over ChatTokenizer (encode text/chat, decode, incremental
detokenization for streams, info)."""
