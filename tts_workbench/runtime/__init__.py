"""Runtime: the code paths that generate speech, upstream's and the workbench's fixes.

The T3 decode loop (eager, static cache, compiled step), dtype policies and float32 islands,
capped upstream generation, naive and buffered streaming, and the two pipelines
(``UpstreamTTS``, ``PerformanceOptimizedTTS``). May import ``core``, ``models`` and
``instruments``.
"""
