"""Studies: reports that run the runtime under the instruments and compare the results.

The side-by-side bench, the ``diagnose`` report and the ``profile`` report. May import every
layer below: ``core``, ``models``, ``instruments``, ``runtime``.
"""
