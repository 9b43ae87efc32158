"""Benchmarks: `lte-ray bench quality` (LTE against its baselines) and `lte-ray bench system`
(where the time, bytes and memory of a run go). Each writes JSON, a markdown table and a plot."""
