"""cProfile inside a mesh service process, for benchmarks/mesh_profile.py --cprofile DIR (never imported otherwise:
only a PYTHONPATH that names this folder loads it).

With MOEMESH_CPROFILE_DIR set and the process's OTEL_SERVICE_NAME (what `moemesh up` gives each child) listed in
MOEMESH_CPROFILE_SERVICES (comma-separated), SIGUSR1 starts a fresh profile of the main thread (the asyncio loop:
where a service's Python work runs) and SIGUSR2 stops it and writes DIR/<service>.prof (pstats format) and
DIR/<service>.gc.json (garbage collections per generation meanwhile). Any other process (the supervisor, `moemesh
up` itself) is left alone.
"""

import os
import signal

_DIR = os.environ.get("MOEMESH_CPROFILE_DIR")
_NAME = os.environ.get("OTEL_SERVICE_NAME", "")
_WANTED = {s.strip() for s in os.environ.get("MOEMESH_CPROFILE_SERVICES", "").split(",") if s.strip()}

if _DIR and _NAME in _WANTED:
    import cProfile
    import gc
    import json

    _state = {"profile": None, "gc": None}

    def _start(signum, frame):
        _state["gc"] = gc.get_stats()
        _state["profile"] = cProfile.Profile()
        _state["profile"].enable()

    def _stop(signum, frame):
        profile, _state["profile"] = _state["profile"], None
        if profile is not None:
            profile.disable()
            collections = [b["collections"] - a["collections"] for a, b in zip(_state["gc"], gc.get_stats())]
            with open(os.path.join(_DIR, f"{_NAME}.gc.json"), "w") as out:  # garbage collections per generation
                json.dump(collections, out)
            profile.dump_stats(os.path.join(_DIR, f"{_NAME}.prof"))

    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)
