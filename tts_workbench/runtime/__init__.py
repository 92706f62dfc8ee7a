"""Runtime: the code paths that generate speech, upstream's and the workbench's fixes.

The T3 decode loop (eager, static cache, compiled step; ``decode``) with its sampling on the
device (``sampling``) and fused projections (``fusion``), dtype policies and float32 islands,
capped upstream generation, Multilingual's alignment analyzer per generation (``alignment``),
naive and buffered streaming, the two pipelines (``UpstreamTTS``, ``PerformanceOptimizedTTS``)
and the stream engine that runs many streams at once (``engine``; its KV cache and batched T3
step: ``batched_step``; a stream as its reader sees it: ``stream_handle``). May import ``core``,
``models`` and ``instruments``.
"""
