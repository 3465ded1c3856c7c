"""Live monitoring of a running mesh: a small HTTP server (stdlib) that scrapes every service's /metrics and
metering's tenant records, computes the three tiers (health, quality, cost), and serves them as JSON and as a page of
live charts (uPlot, vendored under static/). `moemesh up` starts it; `moemesh top` shows tier 1 in a terminal."""
