"""`moemesh bench`: a load generator for the Chat API (like `vllm bench serve`), and the same load on the in-process
Engine for the mesh/in-process ratio.

    workload.py  LoadSpec (what to send, validated), synthetic prompts, Poisson arrival offsets
    load.py      the asyncio client loop (closed loop at `concurrency`, or Poisson arrivals capped at it) over a Backend
    backends.py  Backends: gRPC moemesh.v1.Chat (gateway) and OpenAI HTTP (the edge); imported lazily
    in_process.py  the same load on runtime.engine.Engine, continuous-batching style (imports torch)
    stats.py     per-request records -> {mean, p50, p95, p99} of TTFT, ITL, end-to-end; throughput
    report.py    the table and the JSON document (machine, command)
    progress.py  the progress bar on stderr

Nothing here but in_process.py imports torch: client mode stays light.
"""
