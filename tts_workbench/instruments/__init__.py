"""Instruments: what the workbench measures on a model, without changing what it computes.

Phase-labelled profiler regions and the op frame, the attention kernel recorder, the dtype-flow
tracer, per-chunk latency records, memory windows, device traces read by HolisticTraceAnalysis
and figures. May import ``core`` and ``models``.
"""
