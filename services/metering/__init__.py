"""Metering: tenants, API keys, exact quotas and monthly budgets, the usage ledger, cost of goods and feedback, all
in Redis and shared by every replica.

Domain modules (no grpc, no *_pb2): redis_server / connection (the embedded or external Redis), tenants (tenants
and keys), meter + scripts (Lua: reserve, commit, expiry), ledger, report, feedback, pricing, bootstrap (dev tenant).
gRPC: servicer.py, config.py, __main__.py.
"""
