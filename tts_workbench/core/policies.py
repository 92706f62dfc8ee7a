"""The dtype policies by name and what each one does (``runtime.precision`` applies them).

Free of torch, so the command line offers them as choices and refuses a wrong name at once,
before its heavy imports.
"""

POLICIES = {
    "auto": "decided per device and checkpoint (see choose_policy)",
    "keep": "every component keeps the dtype it was loaded with, but for the islands (cast to float32)",
    "float32": "T3 and S3Gen cast to float32",
    "float16": "T3 and S3Gen cast to float16 (islands stay float32)",
    "bfloat16": "T3 and S3Gen cast to bfloat16 (islands stay float32)",
    "autocast-float16": "float32 weights, T3 and S3Gen run under torch.autocast(float16)",
    "autocast-bfloat16": "float32 weights, T3 and S3Gen run under torch.autocast(bfloat16)",
    "decode-bfloat16": "float32 weights for everything but T3's decode steps, which use a bfloat16 copy",
}
# The policies a run is given by name: "auto" is resolved to one of them per device and checkpoint
# (the wrapper's choose_policy), so a command that applies a policy itself offers these.
NAMED_POLICIES = [name for name in POLICIES if name != "auto"]
