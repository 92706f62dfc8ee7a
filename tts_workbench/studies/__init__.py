"""Studies: reports that run the runtime under the instruments and compare the results.

The side-by-side bench, the ``diagnose``, ``profile`` and ``trace`` reports, and the load study (in
process, and as an HTTP client of any speech endpoint). May import every layer below: ``core``,
``models``, ``instruments``, ``runtime``; not ``serving``, which stands beside it.
"""
