"""The gateway: moemesh's public Chat API (OpenAI-shaped chat completions over gRPC; Envoy transcodes it to JSON)."""
