"""Core: the bottom layer, imported by every other one and importing none of them.

Errors with the fix in their message, the one table renderer, constants (sample rate, token rate,
dtype names), scoped patching that gives back what it changes, torch.compile as the compiled paths
use it, the one clock (synchronised before each read), library noise filters and the table of model
families, the device check (``devices``), files written whole or not at all (``files``), the ports
servers start on (``ports``) and the KV cache positions a request needs (``positions``). Imports,
at load, only the standard library, torch, pandas, upstream chatterbox, transformers (``patching``:
its output capturing) and tqdm (``progress``: ``tqdm.auto`` and ``tqdm.notebook``); inside
functions, when called: tqdm and transformers' logging (``quiet.upstream_bars_off``) and IPython
(``progress.KeptBar``, ``quiet.notebook_setup``).
"""
